"""Benchmark: the power sampler's CPU overhead (sampler thread CPU time / wall time).

The target is < 1 % at the default interval (``energy.sample_interval_s``, 50 ms).
It is a speed figure, so it lives here and in docs/benchmarks.md rather than in a
test, where a slow or loaded machine would fail it (issue 17).

The backend is a fake Jetson INA3221 sysfs tree with 3 rails in a temporary folder,
so every sample really opens and reads files, as on a device.

Usage: ``python scripts/bench_sampler.py [--seconds 3] [--intervals 0.05,0.01,0.002]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fedjax_fm.energy.jetson import JetsonBackend
from fedjax_fm.energy.sampler import DEFAULT_INTERVAL_S, PowerSampler

TARGET = 0.01


def fake_jetson(root: Path) -> JetsonBackend:
    hwmon = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hwmon.mkdir(parents=True)
    for channel, label in enumerate(["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"], start=1):
        (hwmon / f"in{channel}_label").write_text(label)
        (hwmon / f"in{channel}_input").write_text("5000")
        (hwmon / f"curr{channel}_input").write_text("1000")
    return JetsonBackend.discover(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--intervals", default=f"{DEFAULT_INTERVAL_S},0.01,0.002")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backend = fake_jetson(Path(tmp))
        print("| interval | samples | overhead | target < 1 % (default interval) |")
        print("| --- | --- | --- | --- |")
        for interval in [float(x) for x in args.intervals.split(",")]:
            sampler = PowerSampler(backend, interval_s=interval)
            sampler.start()
            time.sleep(args.seconds)
            trace = sampler.stop()
            verdict = ("met" if trace.overhead < TARGET else "MISSED") if interval == DEFAULT_INTERVAL_S else "–"
            print(f"| {interval * 1000:g} ms | {len(trace.times_s)} | {100 * trace.overhead:.2f} % | {verdict} |")


if __name__ == "__main__":
    main()
