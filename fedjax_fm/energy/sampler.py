"""A background thread that samples a power backend while a call runs.

Energy of the interval [t_0, t_n] from samples (t_i, P_i):

* energy counter available (NVML Volta+, RAPL): per rail
  E = sum_i wrap(C_i - C_{i-1}),  wrap(d) = d + R if d < 0 else d,
  with R the counter range (RAPL ``max_energy_range_uj``). Sampling at intervals
  much shorter than the wrap time (minutes to hours) keeps this exact.
* otherwise the trapezoid rule: E = sum_i (t_i - t_{i-1}) (P_i + P_{i-1}) / 2.

The first and last samples are taken synchronously in ``start``/``stop`` so every
interval, however short, has both ends measured and [t_0, t_n] brackets the
metered call to within one sample read. Mean power is E / (t_n - t_0);
peak power is the largest total sample (for RAPL, the largest per-interval mean).

The thread costs CPU: each sample is a handful of small file reads or NVML calls
(tens of microseconds). ``PowerTrace.sampler_cpu_s`` is that cost, measured with
``time.thread_time`` inside the sampling thread; ``overhead`` divides it by the
wall time. Compiled JAX calls release the GIL, so this CPU share is the most the
sampler can take from the metered call.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Sequence

from fedjax_fm.energy.base import PowerBackend, PowerSample, source_label

DEFAULT_INTERVAL_S = 0.05


@dataclasses.dataclass
class PowerTrace:
    """What the sampler saw during one interval; energy fields are None without a source."""

    source: str
    is_estimate: bool
    wall_s: float
    times_s: list[float]  # seconds since start, one per sample
    watts_by_rail: dict[str, list[float]]  # the trace (RAPL: per-interval means, len n-1)
    joules_by_rail: dict[str, float] | None
    joules: float | None
    peak_watts: float | None
    method: str | None  # "counter", "trapezoid" or None
    sampler_cpu_s: float
    start_clock: float | None = None  # the clock's reading at the first sample
    error: str | None = None

    @property
    def mean_watts(self) -> float | None:
        if self.joules is None or self.wall_s <= 0:
            return None
        return self.joules / self.wall_s

    @property
    def overhead(self) -> float:
        """Sampler CPU seconds per wall second of the metered interval."""
        return self.sampler_cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def integrate_trapezoid(times: Sequence[float], watts: Sequence[float]) -> float:
    """Joules from power samples: sum (t_i - t_{i-1}) (P_i + P_{i-1}) / 2."""
    if len(times) != len(watts):
        raise ValueError(f"{len(times)} times but {len(watts)} power samples")
    return sum((times[i] - times[i - 1]) * (watts[i] + watts[i - 1]) / 2 for i in range(1, len(times)))


def counter_deltas(values: Sequence[float], range_j: float | None = None) -> list[float]:
    """Per-step increments of a cumulative counter, undoing wrap-around at ``range_j``."""
    deltas = []
    for previous, current in zip(values, values[1:]):
        delta = current - previous
        if delta < 0:
            if range_j is None:
                raise ValueError(f"energy counter went backwards ({previous} -> {current}) and has no wrap range")
            delta += range_j
        deltas.append(delta)
    return deltas


def summarize_samples(
    backend: PowerBackend, times: Sequence[float], samples: Sequence[PowerSample], sampler_cpu_s: float = 0.0
) -> PowerTrace:
    """Pure: turns timestamped samples into joules, mean and peak watts."""
    times = list(times)
    wall_s = times[-1] - times[0] if len(times) >= 2 else 0.0
    relative = [t - times[0] for t in times] if times else []
    common = dict(source=source_label(backend), is_estimate=backend.is_estimate, wall_s=wall_s,
                  times_s=relative, sampler_cpu_s=sampler_cpu_s, start_clock=times[0] if times else None)
    if len(samples) < 2 or samples[0].watts is None and samples[0].counters_j is None:
        return PowerTrace(**common, watts_by_rail={}, joules_by_rail=None, joules=None, peak_watts=None, method=None)
    ranges = backend.counter_range_j or {}
    if samples[0].counters_j is not None:
        rails = list(samples[0].counters_j)
        steps = {r: counter_deltas([s.counters_j[r] for s in samples], ranges.get(r)) for r in rails}
        joules_by_rail = {r: sum(d) for r, d in steps.items()}
        method = "counter"
        if samples[0].watts is not None:
            watts_by_rail = {r: [s.watts[r] for s in samples] for r in samples[0].watts}
            totals = [sum(s.watts[r] for r in backend.total_rails) for s in samples]
        else:  # RAPL: no instantaneous power, so the trace is per-interval means.
            dts = [b - a for a, b in zip(times, times[1:])]
            watts_by_rail = {r: [d / dt if dt > 0 else 0.0 for d, dt in zip(steps[r], dts)] for r in rails}
            totals = [sum(watts_by_rail[r][i] for r in backend.total_rails) for i in range(len(dts))]
    else:
        watts_by_rail = {r: [s.watts[r] for s in samples] for r in samples[0].watts}
        joules_by_rail = {r: integrate_trapezoid(times, w) for r, w in watts_by_rail.items()}
        totals = [sum(s.watts[r] for r in backend.total_rails) for s in samples]
        method = "trapezoid"
    joules = sum(joules_by_rail[r] for r in backend.total_rails)
    return PowerTrace(**common, watts_by_rail=watts_by_rail, joules_by_rail=joules_by_rail, joules=joules,
                      peak_watts=max(totals) if totals else None, method=method)


class PowerSampler:
    """Samples ``backend`` every ``interval_s`` seconds between ``start()`` and ``stop()``."""

    def __init__(self, backend: PowerBackend, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.perf_counter):
        if not interval_s > 0:
            raise ValueError(f"sampling interval must be > 0 seconds, got {interval_s!r}")
        self.backend = backend
        self.interval_s = float(interval_s)
        self._clock = clock
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._times: list[float] = []
        self._samples: list[PowerSample] = []
        self._cpu_s = 0.0
        self._error: str | None = None
        self._active = backend.name != "none"

    def _take(self) -> float | None:
        """Takes one sample; returns its time (None if the backend failed)."""
        cpu_start = time.thread_time()
        try:
            sample = self.backend.sample()
            now = self._clock()
        except (OSError, ValueError) as why:  # a rail vanished mid-run: energy becomes unknown
            self._error = f"{self.backend.name}: sampling failed: {why}"
            self._stop.set()
            return None
        with self._lock:
            self._times.append(now)
            self._samples.append(sample)
            self._cpu_s += time.thread_time() - cpu_start
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("PowerSampler.start() called twice without stop()")
        self._times, self._samples, self._cpu_s, self._error = [], [], 0.0, None
        self._stop.clear()
        if self._active:
            # Thread first, first sample last: the sampled interval then starts right
            # before the caller's clock does, whatever the thread's start-up costs.
            self._thread = threading.Thread(target=self._run, name="fedjax_fm-power-sampler", daemon=True)
            self._thread.start()
            self._take()
        self._start_time = self._clock()

    def stop(self) -> PowerTrace:
        end_time = self._clock()
        if self._thread is not None:
            # Final sample before joining: a busy machine may take long to schedule the
            # thread, and that delay must not stretch the sampled interval.
            self._stop.set()
            end = self._take() if self._error is None else None
            self._thread.join()
            self._thread = None
            end = end if end is not None else end_time
            with self._lock:
                kept = sorted((t, i) for i, t in enumerate(self._times) if t <= end)
                self._times = [t for t, _ in kept]
                self._samples = [self._samples[i] for _, i in kept]
        if not self._active:
            self._times = [self._start_time, end_time]
        trace = summarize_samples(self.backend, self._times, self._samples, self._cpu_s)
        if self._error is not None:
            trace = dataclasses.replace(trace, joules=None, joules_by_rail=None, peak_watts=None, error=self._error)
        return trace
