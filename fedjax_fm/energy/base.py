"""The power-backend interface and the two trivial backends (constant, none).

A backend answers one question, cheaply, whenever the sampler asks: what does the
hardware say *now*? ``sample()`` returns instantaneous watts per rail and/or
cumulative energy counters per rail. Where a counter exists (NVML's total energy
on Volta+, RAPL's ``energy_uj``) the meter uses it for joules and keeps the watts
as the trace; otherwise it integrates the watts (trapezoid rule).

The concrete hardware backends (``nvml``, ``jetson``, ``rapl``) import this module;
choosing one is :mod:`fedjax_fm.energy.detect`'s job.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

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


