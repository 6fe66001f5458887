"""The ``fedjax-fm`` command line.

Each subcommand lives next to the code it drives and registers itself through an
``add_<name>_command(subparsers)`` function that adds its parser and sets
``func`` (called with the parsed ``argparse.Namespace``, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# subcommand -> (module, registration function)
_COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("fedjax_fm.training.experiment", "add_run_command"),
    "report": ("fedjax_fm.training.report", "add_report_command"),
    "bench": ("fedjax_fm.energy.bench", "add_bench_command"),
    "deploy": ("fedjax_fm.deploy.cli", "add_deploy_command"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedjax-fm",
        description="Federated fine-tuning of FLAN-T5 in JAX with energy, MFU and communication metrics.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, function_name in _COMMANDS.values():
        module = importlib.import_module(module_name)
        getattr(module, function_name)(subparsers)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings for a user: the message, not the source path and ``warnings.warn(...)`` line."""
    label = "warning" if category is UserWarning else f"warning ({category.__name__})"
    return f"{label}: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
