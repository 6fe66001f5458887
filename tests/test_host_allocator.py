"""``host_allocator.keep_freed_memory``: freed large blocks are reused without new page faults."""

import platform
import subprocess
import sys

import pytest

from fedjax_fm import host_allocator
from fedjax_fm.cli import main as cli_main

# Allocates, fills and frees a 64 MiB block twice; prints the minor page faults of the second time.
_PROBE = """
import ctypes, resource, sys
from fedjax_fm.host_allocator import keep_freed_memory
print(keep_freed_memory(), file=sys.stderr)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 << 20)  # as XLA:CPU allocates its buffers
    ctypes.memset(block, 1, 64 << 20)  # written in full
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the setting is glibc's")


def _second_allocation_faults(setting: str) -> tuple[int, str]:
    env = {"PATH": "/usr/bin:/bin", host_allocator.ENV_VAR: setting}
    proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True)
    return int(proc.stdout.strip()), proc.stderr.strip()


@glibc_only
def test_freed_block_is_reused_without_page_faults():
    kept, applied = _second_allocation_faults("keep")
    system, skipped = _second_allocation_faults("system")
    assert (applied, skipped) == ("True", "False")
    # 64 MiB is 16384 pages of 4 KiB: glibc's default maps and faults them anew each time.
    assert system > 8000
    assert kept < 1000


def test_bad_setting_is_refused(monkeypatch, capsys):
    monkeypatch.setenv(host_allocator.ENV_VAR, "jemalloc")
    with pytest.raises(ValueError, match="FEDJAX_FM_HOST_ALLOCATOR must be 'keep'"):
        host_allocator.keep_freed_memory()
    # The command says so in one line and exits 2, before doing anything.
    assert cli_main(["presets"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: FEDJAX_FM_HOST_ALLOCATOR must be 'keep'") and "Traceback" not in err
