"""Cost-to-target and quality-within-budget from metrics rows (``fedjax_fm.training.cost``) and in ``report``."""

from __future__ import annotations

import json

import pytest

from fedjax_fm.training.cost import cost_to_target, cumulative, quality_within_budget, round_modelled_seconds
from fedjax_fm.training.report import write_report


def _row(round_, rouge, up=100, down=400, client_j=2.0, comm_j=0.5, clients=2):
    return {"round": round_, "rougeL": rouge, "clients": clients if round_ else 0,
            "bytes_up": up if round_ else None, "bytes_down": down if round_ else None,
            "client_joules": client_j if round_ else None, "server_joules": 0.1 if round_ else None,
            "comm_joules": comm_j if round_ else None, "client_seconds": 4.0 if round_ else None,
            "server_seconds": 0.5 if round_ else None, "comm_seconds": 1.0 if round_ else None,
            "codec_seconds": None}


ROWS = [_row(0, 10.0), _row(1, None), _row(2, 30.0), _row(3, None), _row(4, 40.0)]


def test_cumulative_sums_training_rounds_only():
    points = cumulative(ROWS)
    assert points[0]["bytes"] == 0 and points[0]["joules"] == 0
    assert points[2]["bytes_up"] == 200 and points[2]["bytes"] == 1000
    assert points[4]["joules"] == pytest.approx(4 * (2.0 + 0.1 + 0.5))
    # Two clients in parallel: 4 s of sequential client time is 2 s of the round.
    assert round_modelled_seconds(ROWS[1]) == pytest.approx(2.0 + 0.5 + 1.0)
    assert points[4]["modelled_seconds"] == pytest.approx(4 * 3.5)


def test_cost_to_default_and_given_target():
    cost = cost_to_target(ROWS)  # 0.9 x 40 = 36: first reached at round 4
    assert cost["target_rougeL"] == pytest.approx(36.0) and cost["reached"]
    assert cost["round"] == 4 and cost["bytes_up"] == 400 and cost["comm_joules"] == pytest.approx(2.0)
    cost = cost_to_target(ROWS, target_rougeL=25.0)
    assert cost["round"] == 2 and cost["bytes"] == 1000 and cost["client_joules"] == pytest.approx(4.0)
    missed = cost_to_target(ROWS, target_rougeL=50.0)
    assert missed["reached"] is False and missed["bytes"] is None
    assert cost_to_target([_row(0, None)]) is None


def test_unmeasured_joules_stay_null():
    rows = [_row(0, 10.0), _row(1, 20.0, client_j=None)]
    assert cost_to_target(rows, target_rougeL=15.0)["client_joules"] is None
    within = quality_within_budget(rows, budget_joules=100.0)
    assert within["round"] == 0  # round 1's joules are unknown, so it cannot be placed under the budget


def test_quality_within_budget():
    assert quality_within_budget(ROWS) is None
    within = quality_within_budget(ROWS, budget_bytes=1500)
    assert within["rougeL"] == 30.0 and within["round"] == 2
    within = quality_within_budget(ROWS, budget_joules=100.0)
    assert within["rougeL"] == 40.0


def test_report_has_cost_table_and_cost_axes(tmp_path):
    for name, rows in {"a": ROWS, "b": [_row(0, 10.0), _row(1, 40.0, up=10)]}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out", target_rougeL=35.0)
    text = report.read_text()
    assert "Cost to reach ROUGE-L ≥ 35.00" in text
    assert "| a | 4 | 0.0004 | 0.002 | 8.00 | 2.0000 | 14.00 |" in text
    assert "| b | 1 | 1e-05 | 0.00041 | 2.00 | 0.5000 | 3.50 | 40.00 (1) |" in text  # budget: b's 410 bytes
    for stem in ("rougeL_vs_bytes_up", "rougeL_vs_bytes", "rougeL_vs_comm_joules", "rougeL_vs_joules"):
        assert (tmp_path / "out" / f"{stem}.png").is_file()
