"""The README's demo command, at reduced size: ``fedjax-fm run configs/default.yaml --out DIR``."""

from __future__ import annotations

import json
from pathlib import Path

from fedjax_fm.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_readme_demo_command_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    # The README command plus overrides that shrink it to one round on a smaller corpus.
    code = main(["run", "configs/default.yaml", "--out", str(out), "--set", "federated.rounds=1",
                 "--set", "data.source.num_train=256", "--set", "eval.max_examples=8", "--set", "output.export=false"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rounds"] == 1 and len(printed["params_sha256"]) == 64
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["rougeL"] is not None and rows[1]["train_loss"] is not None
    # The demo packs its SAMSum-like dialogues: most slots hold real tokens (the full demo: 0.90-0.93).
    assert rows[1]["padding_efficiency"] >= 0.8
    assert (out / "plots" / "rouge.png").is_file()


def test_run_command_reports_config_errors(tmp_path, capsys):
    code = main(["run", str(REPO / "configs" / "default.yaml"), "--out", str(tmp_path / "x"),
                 "--set", "federated.rouds=2"])
    assert code == 2
    assert "did you mean 'rounds'" in capsys.readouterr().err
