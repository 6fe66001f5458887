"""The host CPU's kind: model name, logical CPUs and the vector instruction sets.

Below every floor of the package (no fedjax_fm imports): the run's environment record
(``training/environment.py``) and the cache key of the fused CPU attention kernel
(``models/cpu_attention.py``, code compiled with ``-march=native`` must never be loaded
on another CPU kind) both name the CPU this way.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any

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
