"""Choosing a power backend: by name, or auto-detection with the reason for each skip.

Auto-detection tries, in order: NVML, Jetson INA3221, RAPL, then ``constant``
(only when the user declared watts), then ``none`` -- and reports why each
skipped backend was skipped. The types live in :mod:`fedjax_fm.energy.base`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Sequence

from fedjax_fm.energy.base import (
    BACKEND_NAMES,
    ConstantBackend,
    NoneBackend,
    PowerBackend,
    PowerBackendUnavailable,
    source_label,
)
from fedjax_fm.energy.jetson import JetsonBackend
from fedjax_fm.energy.nvml import NvmlBackend
from fedjax_fm.energy.rapl import RaplBackend
from fedjax_fm.energy.sysfs import Reader, read_text


@dataclasses.dataclass
class Detection:
    """The chosen backend and, for each backend tried before it, why it was skipped."""

    backend: PowerBackend
    skipped: dict[str, str]

    def describe(self) -> str:
        lines = [f"power backend: {source_label(self.backend)}"]
        lines += [f"  skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def make_backend(
    kind: str,
    *,
    constant_watts: float | None = None,
    sysfs_root: str | Path = "/",
    reader: Reader = read_text,
    nvml_module=None,
    nvml_device_indices: Sequence[int] | None = None,
) -> PowerBackend:
    """One named backend, or ``PowerBackendUnavailable`` saying why it cannot read."""
    if kind == "nvml":
        return NvmlBackend(device_indices=nvml_device_indices, nvml=nvml_module)
    if kind == "jetson":
        return JetsonBackend.discover(sysfs_root, reader=reader)
    if kind == "rapl":
        return RaplBackend.discover(sysfs_root, reader=reader)
    if kind == "constant":
        if constant_watts is None:
            raise PowerBackendUnavailable("no watts declared (energy.watts, or --constant-watts)")
        return ConstantBackend(float(constant_watts))
    if kind == "none":
        return NoneBackend()
    raise ValueError(f"unknown power backend {kind!r}; choose 'auto' or one of {BACKEND_NAMES}")


def detect_backend(
    kind: str = "auto",
    *,
    constant_watts: float | None = None,
    sysfs_root: str | Path = "/",
    reader: Reader = read_text,
    nvml_module=None,
    nvml_device_indices: Sequence[int] | None = None,
    log: Callable[[str], None] | None = print,
) -> Detection:
    """Chooses a power backend and says why the ones before it were skipped.

    ``kind="auto"`` tries nvml, jetson, rapl, then constant (only if
    ``constant_watts`` is given), then none. A named ``kind`` either works or raises
    ``PowerBackendUnavailable``: a backend the user asked for never silently
    becomes another.
    """
    options = dict(
        constant_watts=constant_watts,
        sysfs_root=sysfs_root,
        reader=reader,
        nvml_module=nvml_module,
        nvml_device_indices=nvml_device_indices,
    )
    if kind != "auto":
        detection = Detection(make_backend(kind, **options), skipped={})
    else:
        skipped: dict[str, str] = {}
        chosen: PowerBackend | None = None
        for name in ("nvml", "jetson", "rapl", "constant"):
            try:
                chosen = make_backend(name, **options)
                break
            except PowerBackendUnavailable as why:
                skipped[name] = str(why)
        detection = Detection(chosen or NoneBackend(), skipped)
    if log is not None:
        log(detection.describe())
    return detection
