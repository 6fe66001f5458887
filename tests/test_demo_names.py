"""The offline demo, at reduced rounds: its printed examples name the right people, place and day.

`configs/default.yaml` fine-tunes the shipped pretrained base (`demo-base`) with LoRA and
FedAdam; this runs it through the CLI as the README does, with fewer rounds, and reads the
five examples it prints at the end.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedjax_fm.assets import DEMO_BASE_DIR
from fedjax_fm.cli import main
from fedjax_fm.data.synthetic import DAYS, NAMES, PLACES, RESTAURANTS

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 10

pytestmark = pytest.mark.skipif(not (DEMO_BASE_DIR / "model.safetensors").is_file(), reason="demo base not built")


def entities(text: str) -> set[str]:
    """People, places and days named in a summary."""
    words = set(re.findall(r"[A-Za-z]+", text))
    found = {w for w in words if w in NAMES or w in DAYS}
    found |= {p for p in PLACES + RESTAURANTS if re.search(rf"\bthe {re.escape(p)}\b", text)}
    return found


def names_right(prediction: str, reference: str) -> bool:
    """Every person, place and day of the reference also appears in the prediction."""
    return entities(reference) <= entities(prediction)


def test_entities_helper():
    ref = "Clara will meet Jonas at the school on Friday at 11 am."
    assert entities(ref) == {"Clara", "Jonas", "school", "Friday"}
    assert names_right("Clara will meet Jonas at the school on Friday at 5 pm.", ref)
    assert not names_right("Priya will meet Zoe at the airport on Thursday at 11 am.", ref)


def printed_examples(err: str) -> list[tuple[str, str]]:
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("held-out examples"))
    body = lines[start + 1:start + 11]
    return [(body[k].split(". ", 1)[1], body[k + 1].strip()) for k in range(0, len(body), 2)]


@pytest.mark.xfail(strict=False, reason="the demo-base shipped now is under-pretrained: ROUGE-L ~23, names often wrong "
                   "(docs/benchmarks.md, 'Offline demo'); remove this mark once a better base meets the target")
def test_demo_at_reduced_rounds_names_the_right_people_place_and_day(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "demo"
    code = main(["run", "configs/default.yaml", "--out", str(out), "--set", f"federated.rounds={ROUNDS}",
                 "--set", f"eval.every={ROUNDS}", "--set", "output.export=false", "--set", "output.plots=false"])
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert "before and after training" in captured.err
    examples = printed_examples(captured.err)
    assert len(examples) == 5
    right = [names_right(p, r) for p, r in examples]
    assert sum(right) >= 3, examples
    assert summary["final"]["rougeL"] > summary["initial"]["rougeL"] + 20
