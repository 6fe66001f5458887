"""Metering of compiled calls: wall time, energy, tokens/s, η_e and MFU per call.

For one call, with wall time t (dispatch to ``jax.block_until_ready`` on its
outputs), energy E joules over that time, N tokens and F model FLOPs:

    TPS   = N / t                                tokens per second
    W     = E / t_E                              mean watts over the sampled interval t_E ≈ t
    η_e   = TPS / W ≈ N / E                      tokens per second per watt (≈ tokens per joule)
    MFU   = (F / t) / peak                       model FLOP utilisation, peak in FLOP/s

Fields that need a missing input are None (no power source -> no joules, W, η_e;
no peak -> no MFU). Figures from the ``constant`` backend carry
``is_estimate=True`` and ``energy_source="constant (estimate)"``.

Usage::

    meter = Meter(detect_backend().backend, peak_flops=resolve_peak(...).flops_per_s)
    outputs, record = meter.measure("client_update", step_fn, params, batch, tokens=n, flops=f)

    with meter.section("server_update", tokens=0) as section:
        section.block(server_update(state, delta))
    record = section.record
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from fedjax_fm.energy.base import NoneBackend, PowerBackend
from fedjax_fm.energy.sampler import DEFAULT_INTERVAL_S, PowerSampler, PowerTrace


@dataclasses.dataclass
class CallRecord:
    """One metered call (or a sum of calls, see ``sum_records``)."""

    name: str
    wall_s: float
    tokens: float | None = None
    model_flops: float | None = None
    tps: float | None = None
    joules: float | None = None
    joules_by_rail: dict[str, float] | None = None
    mean_watts: float | None = None
    peak_watts: float | None = None
    eta_e: float | None = None
    mfu: float | None = None
    peak_flops: float | None = None
    energy_source: str = "none"
    is_estimate: bool = False
    calls: int = 1
    sampler_overhead: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (None stays None, i.e. null)."""
        return dataclasses.asdict(self)


def safe_div(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is unknown or the denominator is not positive
    (a rate over no time, or per no watt, is not a number we report)."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def make_record(
    name: str,
    wall_s: float,
    trace: PowerTrace | None,
    *,
    tokens: float | None = None,
    flops: float | None = None,
    peak_flops: float | None = None,
) -> CallRecord:
    """Pure: the per-call metrics from a wall time and a power trace."""
    joules = trace.joules if trace is not None else None
    tps = safe_div(tokens, wall_s)
    # W over the interval the energy was measured on (it brackets the call to within a
    # sample read), so a busy host's scheduling delays cannot inflate it.
    mean_watts = trace.mean_watts if trace is not None else None
    return CallRecord(
        name=name,
        wall_s=wall_s,
        tokens=tokens,
        model_flops=flops,
        tps=tps,
        joules=joules,
        joules_by_rail=dict(trace.joules_by_rail) if trace is not None and trace.joules_by_rail else None,
        mean_watts=mean_watts,
        peak_watts=trace.peak_watts if trace is not None else None,
        eta_e=safe_div(tps, mean_watts),
        mfu=safe_div(safe_div(flops, wall_s), peak_flops),
        peak_flops=peak_flops,
        energy_source=trace.source if trace is not None else "none",
        is_estimate=trace.is_estimate if trace is not None else False,
        sampler_overhead=safe_div(trace.sampler_cpu_s, wall_s) if trace is not None and trace.method else None,
    )


def sum_records(records: Iterable[CallRecord], name: str) -> CallRecord:
    """Totals over calls (e.g. all client updates of a round).

    Seconds, joules, tokens and FLOPs add; rates are recomputed from the sums
    (TPS = ΣN/Σt, W = ΣE/Σt, η_e = ΣN/ΣE, MFU = ΣF/Σt/peak). A total is None when
    any part is None: a partly measured sum would be a wrong number.
    """
    records = list(records)
    if not records:
        return CallRecord(name=name, wall_s=0.0, calls=0)

    def total(field: str) -> float | None:
        values = [getattr(r, field) for r in records]
        return None if any(v is None for v in values) else float(sum(values))

    wall_s = float(sum(r.wall_s for r in records))
    tokens, flops, joules = total("tokens"), total("model_flops"), total("joules")
    rails = None
    if joules is not None and all(r.joules_by_rail for r in records):
        rails = {}
        for r in records:
            for rail, value in r.joules_by_rail.items():
                rails[rail] = rails.get(rail, 0.0) + value
    peaks = {r.peak_flops for r in records}
    peak_flops = peaks.pop() if len(peaks) == 1 else None
    peak_watts = [r.peak_watts for r in records]
    sources = {r.energy_source for r in records}
    tps, mean_watts = safe_div(tokens, wall_s), safe_div(joules, wall_s)
    return CallRecord(
        name=name,
        wall_s=wall_s,
        tokens=tokens,
        model_flops=flops,
        tps=tps,
        joules=joules,
        joules_by_rail=rails,
        mean_watts=mean_watts,
        peak_watts=None if any(p is None for p in peak_watts) else max(peak_watts),
        eta_e=safe_div(tps, mean_watts),
        mfu=safe_div(safe_div(flops, wall_s), peak_flops),
        peak_flops=peak_flops,
        energy_source=sources.pop() if len(sources) == 1 else "mixed",
        is_estimate=any(r.is_estimate for r in records),
        calls=sum(r.calls for r in records),
        sampler_overhead=safe_div(
            None if any(r.sampler_overhead is None for r in records) else sum(r.sampler_overhead * r.wall_s for r in records),
            wall_s,
        ),
    )


def _as_number(value: Any) -> float | None:
    """Tokens/FLOPs may be device arrays computed inside the step; read them after blocking."""
    if value is None:
        return None
    return float(np.asarray(value))


class Section:
    """Handle of ``Meter.section``: call ``block(outputs)`` on the section's outputs."""

    def __init__(self, tokens: Any = None, flops: Any = None):
        self.tokens, self.flops = tokens, flops
        self.outputs: Any = None
        self.record: CallRecord | None = None

    def block(self, outputs: Any) -> Any:
        self.outputs = jax.block_until_ready(outputs)
        return self.outputs


class Meter:
    """Meters calls with a power backend; one sampler thread per metered call."""

    def __init__(
        self,
        backend: PowerBackend | None = None,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        peak_flops: float | None = None,
    ):
        self.backend = backend if backend is not None else NoneBackend()
        self.interval_s = interval_s
        self.peak_flops = peak_flops
        self.records: list[CallRecord] = []
        self.last_trace: PowerTrace | None = None

    @contextlib.contextmanager
    def section(self, name: str, *, tokens: Any = None, flops: Any = None) -> Iterator[Section]:
        """Meters the body; outputs passed to ``section.block`` are waited for before the clock stops."""
        handle = Section(tokens, flops)
        sampler = PowerSampler(self.backend, self.interval_s)
        sampler.start()
        start = time.perf_counter()
        try:
            yield handle
            if handle.outputs is None:
                # Without outputs we cannot wait for the device; finish queued work instead.
                jax.effects_barrier()
        finally:
            wall_s = time.perf_counter() - start
            trace = sampler.stop()
        self.last_trace = trace
        handle.record = make_record(
            name, wall_s, trace, tokens=_as_number(handle.tokens), flops=_as_number(handle.flops),
            peak_flops=self.peak_flops,
        )
        self.records.append(handle.record)

    def measure(self, name: str, fn: Callable[..., Any], *args: Any, tokens: Any = None, flops: Any = None,
                **kwargs: Any) -> tuple[Any, CallRecord]:
        """Runs ``fn(*args, **kwargs)`` metered; returns ``(outputs, record)``.

        ``tokens`` may be a callable of the outputs (e.g. a count the step returns).
        """
        with self.section(name, flops=flops) as handle:
            outputs = handle.block(fn(*args, **kwargs))
            handle.tokens = tokens(outputs) if callable(tokens) else tokens
        return outputs, handle.record

    def pop_records(self) -> list[CallRecord]:
        """The records since the last pop (e.g. one round's), clearing them."""
        records, self.records = self.records, []
        return records
