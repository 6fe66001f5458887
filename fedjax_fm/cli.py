"""The ``fedjax-fm`` command line.

Each subcommand lives next to the code it drives and registers itself through an
``add_<name>_command(subparsers)`` function that adds its parser and sets
``func`` (called with the parsed ``argparse.Namespace``, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata
from pathlib import Path
import warnings

# subcommand -> (module, registration function)
_COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("fedjax_fm.training.experiment", "add_run_command"),
    "report": ("fedjax_fm.training.report", "add_report_command"),
    "bench": ("fedjax_fm.energy.bench", "add_bench_command"),
    "deploy": ("fedjax_fm.deploy.cli", "add_deploy_command"),
    "use": ("fedjax_fm.training.use", "add_use_commands"),  # summarize, eval
    "lineage": ("fedjax_fm.training.lineage", "add_lineage_command"),
}


def version() -> str:
    """The installed package's version (``pyproject.toml``)."""
    try:
        return metadata.version("fedjax-fm")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


# Where the shipped experiment files are: beside the package in a source checkout.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def _presets_command(args: argparse.Namespace) -> int:
    from fedjax_fm.models.config import PRESETS

    print("model presets (model.name; the google/ prefix is accepted):")
    for name, config in PRESETS.items():
        print(f"  {name:<15} d_model {config.d_model:>5}  layers {config.num_layers:>2}+{config.num_decoder_layers:<2} "
              f"heads {config.num_heads:>2}  d_ff {config.d_ff:>5}  vocab {config.vocab_size}")
    from fedjax_fm.assets import SHIPPED_MODELS

    print("pretrained models shipped in the package (model.name; no download):")
    for name, directory in SHIPPED_MODELS.items():
        print(f"  {name:<15} {directory}")
    if CONFIGS_DIR.is_dir():
        print(f"experiment configs (in {CONFIGS_DIR.parent}):")
        for path in sorted(CONFIGS_DIR.rglob("*.yaml")):
            print(f"  {path.relative_to(CONFIGS_DIR.parent)}")
    return 0


def _add_presets_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("presets", help="list the model presets and the shipped experiment configs",
                                   description="List the model presets (model.name) and the experiment configs.")
    parser.set_defaults(func=_presets_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedjax-fm",
        description="Federated fine-tuning of FLAN-T5 in JAX with energy, MFU and communication metrics.",
    )
    parser.add_argument("--version", action="version", version=f"fedjax-fm {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_presets_command(subparsers)
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
    from fedjax_fm.host_allocator import keep_freed_memory

    try:
        keep_freed_memory()  # before any compiled call allocates (fedjax_fm/host_allocator.py)
    except ValueError as error:  # a bad FEDJAX_FM_HOST_ALLOCATOR
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
