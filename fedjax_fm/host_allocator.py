"""Keep freed host memory for reuse: glibc ``malloc`` settings for XLA:CPU's buffers.

**Why.** On the CPU, XLA allocates the buffers of every run of a compiled function with
the C allocator. glibc serves blocks above its mmap threshold (128 KiB, adapting up to
32 MiB) with fresh ``mmap`` pages and unmaps them on ``free``, so each training step
touches hundreds of MB of new pages and the kernel zeroes every one of them on the first
write (a minor page fault). On the 2-core CPU of ``docs/benchmarks.md`` the packed
flan-t5-small bench worker took 1.9 M page faults for 4 steps (compilation included)
against 1.3 M, and its steps ran 5 % slower than with the memory kept; a lone [18432, 64] x [64, 512] product into a new 38 MB buffer took
19 ms instead of 7 ms (9 217 faults per call instead of 462).

:func:`keep_freed_memory` sets ``M_MMAP_MAX = 0`` (large blocks come from the heap,
which ``free`` keeps for the next request) and ``M_TRIM_THRESHOLD`` to 2 GiB (freed
memory at the top of the heap is returned to the system only beyond that). Peak memory
is what it was (+1 % measured); memory freed after the peak is not handed back.

The ``fedjax-fm`` command calls it once at start-up, the Flower ClientApp before each
device's training (``deploy/apps.py``), and so do the JAX workers of
``scripts/bench_model.py`` and ``scripts/bench_real_lengths.py``. A script that drives the Python API can call it first thing. It only acts
on Linux with glibc; set ``FEDJAX_FM_HOST_ALLOCATOR=system`` to leave ``malloc`` alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int
ENV_VAR = "FEDJAX_FM_HOST_ALLOCATOR"


def keep_freed_memory() -> bool:
    """Applies the settings above; True if they were applied, False if skipped.

    Skipped when ``FEDJAX_FM_HOST_ALLOCATOR=system``, on a system without glibc, or if
    ``mallopt`` refuses a setting. Safe to call more than once.
    """
    choice = os.environ.get(ENV_VAR, "keep").strip().lower()
    if choice == "system":
        return False
    if choice != "keep":
        raise ValueError(f"{ENV_VAR} must be 'keep' (the default) or 'system', got {choice!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


__all__ = ["ENV_VAR", "keep_freed_memory"]
