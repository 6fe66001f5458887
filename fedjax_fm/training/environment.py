"""The software and hardware a run's numbers depend on, as one JSON-ready dict.

Bit-identical parameters are promised for the same config, seed *and machine*:
the versions of the numerical stack, the device kind, the host CPU's instruction sets
(XLA:CPU compiles for the features of the CPU it runs on: two x86-64 machines with and
without AVX-512 round differently) and ``XLA_FLAGS`` all change the floating-point
results. ``environment()`` records them once, for both
``summary.json`` and the lineage record (``training/lineage.py``).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedjax_fm.host_cpu import host_cpu  # re-exported: environment()['host_cpu']

# Distribution names (as pip knows them) whose versions are recorded.
PACKAGES: tuple[str, ...] = (
    "fedjax-fm",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "transformers",
    "sentencepiece",
    "numpy",
    "dp-accounting",
)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """``{distribution: version}`` from installed metadata (None when not installed).

    Metadata, not imports: recording ``transformers``'s version must not import it.
    """
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_source() -> dict[str, Any]:
    """Where ``fedjax_fm`` is imported from, and its git commit when that is a checkout.

    ``{"version", "path", "git_commit", "git_dirty"}``; the git fields are None for an
    installed wheel (no ``.git`` above the package). ``git_dirty``: tracked files
    differ from the commit, so the commit alone does not identify the code.
    """
    import fedjax_fm

    package_dir = Path(fedjax_fm.__file__).resolve().parent
    root = package_dir.parent
    commit = dirty = None
    if (root / ".git").exists():  # a directory, or a file in a git worktree
        commit = _git(root, "rev-parse", "HEAD")
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        dirty = None if status is None else bool(status)
    return {
        "version": getattr(fedjax_fm, "__version__", None) or package_versions(("fedjax-fm",))["fedjax-fm"],
        "path": str(package_dir),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def devices() -> dict[str, Any]:
    """JAX's default backend, and the kind and count of its devices."""
    import jax

    devs = jax.devices()
    kinds = sorted({d.device_kind for d in devs})
    return {
        "backend": jax.default_backend(),
        "platforms": sorted({d.platform for d in devs}),
        "device_kinds": kinds,
        "device_count": len(devs),
        "process_count": jax.process_count(),
    }


def environment() -> dict[str, Any]:
    """The run's environment: python, package versions, fedjax_fm's source, devices, host CPU, XLA_FLAGS
    and whether the fused CPU attention kernel runs (``models.cpu_attention.status``).

    Deterministic on a given machine and checkout (no timestamps, no host names), so
    two runs on the same machine record equal dicts — which lineage relies on.
    """
    from fedjax_fm.models import cpu_attention  # imports jax, as devices() does

    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "os": f"{platform.system()} {platform.machine()}",
        "packages": package_versions(),
        "fedjax_fm": package_source(),
        "devices": devices(),
        "host_cpu": host_cpu(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "cpu_attention": cpu_attention.status(),
        "executable": sys.executable,
    }
