"""The software and hardware a run's numbers depend on, as one JSON-ready dict.

Bit-identical parameters are promised for the same config, seed *and machine*:
the versions of the numerical stack, the device kind, the host CPU's instruction sets
(XLA:CPU compiles for the features of the CPU it runs on: two x86-64 machines with and
without AVX-512 round differently) and ``XLA_FLAGS`` all change the floating-point
results. ``environment()`` records them once, for both
``summary.json`` and the lineage record (``training/lineage.py``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# /proc/cpuinfo flags that name vector or arithmetic instruction sets LLVM may use when
# XLA:CPU compiles for the host ("avx512f", "avx512_bf16", "amx_tile", "fma", ...).
_ISA_FLAG_PREFIXES: tuple[str, ...] = ("sse", "ssse", "avx", "amx", "fma", "f16c", "asimd", "sve", "neon")


def host_cpu(cpuinfo: str | None = None) -> dict[str, Any]:
    """The host CPU: ``{"model", "logical_cpus", "isa", "isa_signature"}``.

    ``isa`` lists the instruction-set flags of ``/proc/cpuinfo`` (first processor) that
    XLA:CPU's code generation may use, sorted; ``isa_signature`` is the first 12 hex
    digits of SHA-256 over them, a short name for "same vector instructions" (empty
    list, and the signature of nothing, where ``/proc/cpuinfo`` is absent). ``cpuinfo``:
    the file's text, for tests.
    """
    model = platform.processor() or None
    flags: list[str] = []
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in (None, "", platform.machine()):
            model = value.strip() or model
        elif key in ("flags", "features") and not flags:
            flags = sorted({f for f in value.split() if f.startswith(_ISA_FLAG_PREFIXES)})
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "isa": flags,
        "isa_signature": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:12],
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
