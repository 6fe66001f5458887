"""Per-run plots and the multi-run Markdown report, from metrics rows alone."""

from __future__ import annotations

import json

import pytest

from fedjax_fm.training.report import markdown_table, plot_run, read_metrics, write_report


def _write_run(directory, rouge_gain: float, joules: bool):
    directory.mkdir(parents=True)
    rows = [{"round": 0, "train_loss": None, "eval_loss": 5.0, "rougeL": 10.0, "rouge1": 12.0, "rouge2": 3.0,
             "rougeLsum": 10.0, "client_joules": None}]
    for r in (1, 2, 3):
        rows.append({
            "round": r, "train_loss": 5.0 - r, "eval_loss": 5.0 - r if r != 2 else None,
            "rougeL": 10.0 + rouge_gain * r if r != 2 else None, "rouge1": 12.0 + r, "rouge2": 3.0, "rougeLsum": 10.0 + r,
            "client_joules": 2.0 * r if joules else None, "server_joules": 0.1 if joules else None,
            "comm_joules": 0.01, "tps_per_watt": 3.0 if joules else None, "mfu": None, "granularity": 50.0,
        })
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"params_sha256": "ab" * 32, "totals": {"compute_joules": 12.3 if joules else None, "comm_joules": 0.03,
                                                       "seconds": 4.5,
                                                       "bytes_up": 2e6, "bytes_down": 2e6}}
    (directory / "summary.json").write_text(json.dumps(summary))
    return directory


def test_plot_run_writes_every_panel_even_when_unmeasured(tmp_path):
    run = _write_run(tmp_path / "run", 2.0, joules=False)
    written = plot_run(run)
    assert sorted(p.name for p in written) == sorted(
        ["loss.png", "rouge.png", "energy.png", "efficiency.png", "mfu.png", "granularity.png"])
    assert all(p.stat().st_size > 1000 for p in written)


def test_report_table_and_overlays(tmp_path):
    a = _write_run(tmp_path / "fedadam", 5.0, joules=True)
    b = _write_run(tmp_path / "fedavg", 1.0, joules=False)
    report = write_report([a, b], tmp_path / "out")
    text = report.read_text()
    scores, costs = text.split("Cost to reach")  # the scores table, then the cost-to-target table
    lines = [line for line in scores.splitlines() if line.startswith("| fed")]
    assert len(lines) == 2
    assert [line.split(" | ")[1] for line in costs.splitlines() if line.startswith("| fed")] == ["3", "not reached"]
    adam = lines[0].split(" | ")
    assert adam[0] == "| fedadam" and adam[1] == "3"  # rounds
    assert "25.00 (3)" in lines[0]  # best ROUGE-L and its round
    assert "| 12.30 | 0.03 |" in lines[0] and "| – | 0.03 |" in lines[1]  # compute J measured / not; comm J modelled
    assert "`abababababab…`" in lines[0]
    assert (tmp_path / "out" / "rougeL.png").is_file()
    assert (tmp_path / "out" / "client_joules.png").is_file()
    assert not (tmp_path / "out" / "mfu.png").exists()  # measured by neither run: no empty panel
    assert "![rougeL](rougeL.png)" in text


def test_missing_or_damaged_metrics_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_markdown_table_handles_runs_without_evaluation():
    table = markdown_table([("empty", [{"round": 1, "train_loss": 2.0}], {})])
    assert "| empty | 1 |" in table


def test_an_empty_panel_says_why():
    from fedjax_fm.training.report import why_not_measured

    rows = [{"round": 0, "energy_source": "none"}, {"round": 1, "energy_source": "none", "train_loss": 2.0}]
    assert "no power meter" in why_not_measured("energy", rows) and "energy.backend" in why_not_measured("energy", rows)
    assert "no power meter" in why_not_measured("efficiency", rows)
    assert "energy.peak_flops" in why_not_measured("mfu", rows) and "bench peak" in why_not_measured("mfu", rows)
    assert "no evaluation" in why_not_measured("rouge", rows)
    metered = [{"round": 1, "energy_source": "rapl", "client_joules": None}]
    assert "no power meter" not in why_not_measured("energy", metered)
