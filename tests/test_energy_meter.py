"""Sampler and meter: accuracy on synthetic power with known joules, null fields without a source."""

from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import pytest

from fedjax_fm.energy.base import ConstantBackend, NoneBackend, PowerSample
from fedjax_fm.energy.jetson import JetsonBackend
from fedjax_fm.energy.meter import Meter, make_record, sum_records
from fedjax_fm.energy.sampler import PowerSampler, counter_deltas, integrate_trapezoid


class SyntheticPower:
    """P(t) = 50 + 30 sin(2π t / 0.25) watts on one rail, t from construction; E(t) its integral."""

    name = "synthetic"
    is_estimate = False
    total_rails = ("board",)
    counter_range_j = None

    def __init__(self, with_counter: bool):
        self.origin = time.perf_counter()
        self.with_counter = with_counter

    @staticmethod
    def energy(t: float) -> float:
        return 50 * t - 30 * 0.25 / (2 * math.pi) * (math.cos(2 * math.pi * t / 0.25) - 1)

    def sample(self) -> PowerSample:
        t = time.perf_counter() - self.origin
        watts = {"board": 50 + 30 * math.sin(2 * math.pi * t / 0.25)}
        return PowerSample(watts=watts, counters_j={"board": self.energy(t)} if self.with_counter else None)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("with_counter", [False, True])
def test_sampler_joules_match_known_integral(with_counter):
    backend = SyntheticPower(with_counter)
    sampler = PowerSampler(backend, interval_s=0.002)
    sampler.start()
    time.sleep(0.6)
    trace = sampler.stop()
    # The exact energy over the sampled interval [first sample, last sample].
    start = trace.start_clock - backend.origin
    expected = backend.energy(start + trace.wall_s) - backend.energy(start)
    assert trace.method == ("counter" if with_counter else "trapezoid")
    assert len(trace.times_s) > 50
    assert trace.joules == pytest.approx(expected, rel=0.01)
    assert trace.mean_watts == pytest.approx(expected / trace.wall_s, rel=0.01)
    assert trace.peak_watts <= 80.0 + 1e-9 and trace.peak_watts > 75.0
    # The sampler's CPU share is reported (a fraction); how small it is, is a speed figure
    # for scripts/bench_sampler.py, not a test (a loaded machine would fail it).
    assert 0.0 <= trace.overhead < 1.0


def test_sampler_at_default_interval_samples_real_files_and_reports_its_overhead(tmp_path):
    """The < 1 % overhead target at the default interval is measured by
    ``scripts/bench_sampler.py`` (docs/benchmarks.md), not asserted here: a timing target
    inside a test fails on a slow or loaded machine (issue 17)."""
    hwmon = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hwmon.mkdir(parents=True)
    for channel, label in enumerate(["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"], start=1):
        (hwmon / f"in{channel}_label").write_text(label)
        (hwmon / f"in{channel}_input").write_text("5000")
        (hwmon / f"curr{channel}_input").write_text("1000")
    backend = JetsonBackend.discover(tmp_path)  # real file reads per sample
    sampler = PowerSampler(backend)  # default interval
    sampler.start()
    time.sleep(1.0)
    trace = sampler.stop()
    assert len(trace.times_s) >= 10
    assert 0.0 <= trace.overhead < 1.0


def test_trapezoid_and_counter_helpers():
    assert integrate_trapezoid([0, 1, 3], [10, 20, 20]) == pytest.approx(15 + 40)
    assert counter_deltas([5.0, 9.0, 1.0], range_j=10.0) == pytest.approx([4.0, 2.0])
    with pytest.raises(ValueError, match="went backwards"):
        counter_deltas([5.0, 1.0])


def test_meter_on_this_machine_without_power_source_gives_null_energy():
    meter = Meter(NoneBackend(), peak_flops=None)
    matmul = jax.jit(lambda x: x @ x)
    x = jnp.ones((64, 64))
    outputs, record = meter.measure("matmul", matmul, x, tokens=128, flops=2 * 64**3)
    assert outputs.shape == (64, 64)
    assert record.wall_s > 0 and record.tps == pytest.approx(128 / record.wall_s)
    for field in ("joules", "joules_by_rail", "mean_watts", "peak_watts", "eta_e", "mfu"):
        assert getattr(record, field) is None, field
    assert record.energy_source == "none" and not record.is_estimate
    assert json.loads(json.dumps(record.to_dict()))["joules"] is None


def test_constant_backend_is_labelled_estimate_and_mfu_uses_peak():
    meter = Meter(ConstantBackend(20.0), interval_s=0.01, peak_flops=1e9)
    with meter.section("sleepy", tokens=jnp.asarray(1000), flops=5e7) as section:
        time.sleep(0.05)
        section.block(jnp.zeros(3))
    record = section.record
    assert record.energy_source == "constant (estimate)" and record.is_estimate
    assert record.mean_watts == pytest.approx(20.0, rel=1e-9)  # trapezoid of a constant is exact
    # The sampled interval brackets the call: thread start-up and join are outside it.
    assert record.wall_s <= meter.last_trace.wall_s <= record.wall_s + 0.02
    assert record.eta_e == pytest.approx(record.tps / record.mean_watts)
    assert record.eta_e == pytest.approx(1000 / record.joules, rel=0.05)
    assert record.mfu == pytest.approx(5e7 / record.wall_s / 1e9)
    assert meter.pop_records() == [record] and meter.records == []


def test_sum_records_recomputes_rates_and_nulls_partial_energy():
    a = make_record("a", 2.0, None, tokens=100, flops=1e9, peak_flops=1e10)
    b = make_record("b", 3.0, None, tokens=400, flops=4e9, peak_flops=1e10)
    total = sum_records([a, b], "round")
    assert total.calls == 2 and total.wall_s == 5.0
    assert total.tps == pytest.approx(100.0) and total.mfu == pytest.approx(5e9 / 5.0 / 1e10)
    assert total.joules is None and total.eta_e is None
    a.joules, b.joules = 10.0, 20.0
    a.joules_by_rail, b.joules_by_rail = {"gpu0": 10.0}, {"gpu0": 20.0}
    total = sum_records([a, b], "round")
    assert total.joules == 30.0 and total.joules_by_rail == {"gpu0": 30.0}
    assert total.eta_e == pytest.approx(500 / 30.0)
    b.joules = None
    assert sum_records([a, b], "round").joules is None
