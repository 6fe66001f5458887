"""`fedjax-fm bench step` / `bench peak` end to end on the tiny preset (CPU, seconds)."""

from __future__ import annotations

import csv

import pytest

from fedjax_fm.cli import main
from fedjax_fm.energy.base import NoneBackend
from fedjax_fm.energy.bench import run_step_benchmark


def test_bench_step_tiny_writes_csv_and_plot_with_estimate_labels(tmp_path, capsys):
    code = main(["bench", "step", "--preset", "tiny", "--mode", "lora", "--batch-size", "2", "--seq-len", "32",
                 "--steps", "2", "--warmup", "1", "--power-backend", "constant", "--constant-watts", "12.5",
                 "--interval", "0.005", "--peak-flops", "1e10", "--out", str(tmp_path)])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "bench_step.csv")))
    assert len(rows) == 1
    row = rows[0]
    assert row["error"] == "" and row["mode"] == "lora" and row["target_len"] == "8"
    assert float(row["tps"]) == pytest.approx(2 * (32 + 8) / float(row["step_seconds"]), rel=1e-6)
    assert float(row["mfu"]) == pytest.approx(float(row["model_flops_per_step"]) / float(row["step_seconds"]) / 1e10,
                                              rel=1e-6)
    assert row["energy_source"] == "constant (estimate)" and row["is_estimate"] == "True"
    assert float(row["mean_watts"]) == pytest.approx(12.5, rel=0.05)
    assert float(row["eta_e"]) == pytest.approx(float(row["tps"]) / float(row["mean_watts"]), rel=1e-6)
    assert (tmp_path / "bench_step.png").stat().st_size > 1000
    assert "power backend: constant (estimate)" in capsys.readouterr().out


def test_failed_point_is_reported_not_fatal():
    rows = run_step_benchmark(presets=["no-such-model"], modes=["full"], batch_sizes=[2], source_lens=[8],
                              target_len=None, dtypes=["float32"], steps=1, warmup=1, backend=NoneBackend(),
                              interval_s=0.05, log=lambda line: None)
    assert rows[0]["error"].startswith("ValueError: unknown model preset 'no-such-model'")
    assert rows[0]["tps"] is None


def test_bench_peak_prints_and_caches(tmp_path, capsys):
    cache = tmp_path / "peaks.json"
    assert main(["bench", "peak", "--size", "64", "--seconds", "0.01", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "float32: measured" in out and str(cache) in out
    assert cache.exists()
