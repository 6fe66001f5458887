"""Reading small numeric files from sysfs, with the reader injectable for tests.

Power sources on Linux (hwmon, iio, powercap) expose one number per file. Every
backend reads them through a ``Reader`` -- a function ``path -> text`` -- so tests
can point the real parsing code at a fake tree and inject errors such as
``PermissionError`` (``chmod 000`` does not stop root, who often runs CI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

Reader = Callable[[Path], str]


def read_text(path: Path) -> str:
    """The stripped text of a sysfs file (raises ``OSError`` subclasses as ``open`` does)."""
    with open(path, encoding="ascii", errors="replace") as handle:
        return handle.read().strip()


def read_number(reader: Reader, path: Path) -> float:
    """A sysfs file holding one number, as a float; ``ValueError`` names the file."""
    text = reader(path)
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: expected a number, read {text!r}") from None


def describe_os_error(error: OSError, path: Path) -> str:
    """A one-line reason such as 'permission denied reading /sys/.../energy_uj'."""
    if isinstance(error, PermissionError):
        return f"permission denied reading {path}"
    if isinstance(error, FileNotFoundError):
        return f"{path} does not exist"
    return f"cannot read {path}: {error.strerror or error}"
