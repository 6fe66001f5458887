"""The power-backend interface, the two trivial backends and auto-detection.

A backend answers one question, cheaply, whenever the sampler asks: what does the
hardware say *now*? ``sample()`` returns instantaneous watts per rail and/or
cumulative energy counters per rail. Where a counter exists (NVML's total energy
on Volta+, RAPL's ``energy_uj``) the meter uses it for joules and keeps the watts
as the trace; otherwise it integrates the watts (trapezoid rule).

Auto-detection tries, in order: NVML, Jetson INA3221, RAPL, then ``constant``
(only when the user declared watts), then ``none`` -- and reports why each
skipped backend was skipped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Protocol, Sequence

from fedjax_fm.energy.sysfs import Reader, read_text

BACKEND_NAMES = ("nvml", "jetson", "rapl", "constant", "none")


class PowerBackendUnavailable(RuntimeError):
    """A backend cannot read power on this machine; the message says why."""


@dataclasses.dataclass(frozen=True)
class PowerSample:
    """One reading. ``watts``: instantaneous power per rail (None if the source has
    none, e.g. RAPL). ``counters_j``: cumulative energy per rail in joules (None if
    the source keeps no counter)."""

    watts: dict[str, float] | None
    counters_j: dict[str, float] | None = None


class PowerBackend(Protocol):
    """What the sampler needs from a power source."""

    name: str
    is_estimate: bool
    #: rails whose sum is the device total (others are sub-rails, kept per rail only).
    total_rails: tuple[str, ...]
    #: counter range per rail in joules, for wrap-around (None: never wraps).
    counter_range_j: dict[str, float] | None

    def sample(self) -> PowerSample: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class ConstantBackend:
    """User-declared constant power. Every figure derived from it is an estimate."""

    watts: float
    name: str = "constant"
    is_estimate: bool = True
    total_rails: tuple[str, ...] = ("declared",)
    counter_range_j: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not (self.watts > 0):
            raise ValueError(f"constant power backend needs watts > 0, got {self.watts!r}")

    def sample(self) -> PowerSample:
        return PowerSample(watts={"declared": float(self.watts)})

    def close(self) -> None:
        pass


@dataclasses.dataclass
class NoneBackend:
    """No power source: every energy field of a metered call is null."""

    name: str = "none"
    is_estimate: bool = False
    total_rails: tuple[str, ...] = ()
    counter_range_j: dict[str, float] | None = None

    def sample(self) -> PowerSample:
        return PowerSample(watts=None)

    def close(self) -> None:
        pass


def source_label(backend: PowerBackend) -> str:
    """The ``energy_source`` string written next to every figure."""
    return f"{backend.name} (estimate)" if backend.is_estimate else backend.name


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
    # Imported here: each backend module is small, and NVML's import is itself lazy.
    from fedjax_fm.energy.jetson import JetsonBackend
    from fedjax_fm.energy.nvml import NvmlBackend
    from fedjax_fm.energy.rapl import RaplBackend

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
