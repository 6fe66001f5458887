"""The demo's documented figures are the code's: a drift check at reduced rounds, and
the demo's printed examples name the people of their own dialogues.

``docs/benchmarks.md`` carries one machine-readable line for the offline demo::

    <!-- demo-check rounds=R machine=x86_64 cpus=2 cpu_isa=... params_sha256=... eval_loss=... -->

written from a real run of ``fedjax-fm run configs/default.yaml`` at ``R`` rounds. This test
reruns that command and compares. The fingerprint is defined per machine kind: XLA:CPU's
float rounding follows the CPU architecture, its vector instruction sets (``cpu_isa``, the
``isa_signature`` of ``summary.json``'s ``environment.host_cpu``) and core count, and the
package versions of ``constraints.txt``. On the documented kind the sha and the loss
(to 1e-6) must match. On another kind the sha is skipped with the reason and the loss is
compared to 0.05: rounding differences grow over 20 rounds of training (1.041 against
1.029 on two 2-core x86-64 VMs of different speed), while a change to the demo's
config or code moves it by more (1.269 -> 1.041 for 1024 -> 4096 training dialogues).

The same run's five printed examples are read as a user reads them: each prediction
should name the people, place and day of its own dialogue (the earlier demo, a tiny model
trained from scratch, printed one template with the same wrong names for every input).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedjax_fm.data.synthetic import NAMES

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- demo-check (?P<fields>[^>]*) -->")


def documented_check() -> dict[str, str]:
    text = (REPO / "docs" / "benchmarks.md").read_text()
    found = MARKER.findall(text)
    assert len(found) == 1, "docs/benchmarks.md must carry exactly one '<!-- demo-check ... -->' line"
    return dict(item.split("=", 1) for item in found[0].split())


def test_demo_check_line_is_complete():
    check = documented_check()
    assert set(check) == {"rounds", "machine", "cpus", "cpu_isa", "params_sha256", "eval_loss"}
    assert re.fullmatch(r"[0-9a-f]{64}", check["params_sha256"])
    assert re.fullmatch(r"[0-9a-f]{12}", check["cpu_isa"])


def people(text: str) -> set[str]:
    return {w for w in re.findall(r"[A-Za-z]+", text) if w in NAMES}


def first_person(text: str) -> str | None:
    """The first person a summary names (its subject), or None."""
    return next((w for w in re.findall(r"[A-Za-z]+", text) if w in NAMES), None)


def printed_examples(err: str) -> list[tuple[str, str]]:
    """The ``(prediction, reference)`` pairs a run prints at its end."""
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("held-out examples"))
    body = lines[start + 1:start + 11]
    return [(body[k].split(". ", 1)[1], body[k + 1].strip()) for k in range(0, len(body), 2)]


def test_example_helpers():
    assert people("Clara and Clara will meet Jonas") == {"Clara", "Jonas"}
    assert first_person("Later Jonas will meet Clara") == "Jonas" and first_person("see you") is None
    err = "x\nheld-out examples (prediction / reference), the first 5:\n" + "".join(
        f"  {k}. P{k} one. two\n     R{k}\n" for k in range(1, 6)) + "done: 1 rounds"
    assert printed_examples(err)[0] == ("P1 one. two", "R1") and len(printed_examples(err)) == 5


def readme_environment() -> dict[str, str]:
    """The environment a user runs the README's command in: this one without the test
    settings of ``tests/conftest.py`` (4 forced host devices, "highest" matmul precision),
    which change XLA:CPU's float rounding and so the fingerprint."""
    env = dict(os.environ)
    if env.get("XLA_FLAGS") == "--xla_force_host_platform_device_count=4":
        del env["XLA_FLAGS"]
    env.pop("JAX_DEFAULT_MATMUL_PRECISION", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_demo_at_reduced_rounds_matches_the_documented_figures(tmp_path, load_script):
    check = documented_check()
    rounds = int(check["rounds"])
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "fedjax_fm", "run", "configs/default.yaml", "--out", str(out),
               "--set", f"federated.rounds={rounds}", "--set", f"eval.every={rounds}",
               "--set", "output.export=false", "--set", "output.plots=false"]
    result = subprocess.run(command, cwd=REPO, env=readme_environment(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    cpu = json.loads((out / "summary.json").read_text())["environment"]["host_cpu"]
    same_kind = (platform.machine() == check["machine"] and os.cpu_count() == int(check["cpus"])
                 and cpu["isa_signature"] == check["cpu_isa"])
    assert summary["final"]["eval_loss"] == pytest.approx(float(check["eval_loss"]), abs=1e-6 if same_kind else 0.05)
    assert "before and after training" in result.stderr
    examples = printed_examples(result.stderr)
    assert len(examples) == 5
    # Each summary starts with who does something, at a place on a day. At these rounds
    # the fine-tuned base takes the people, the place and the day from the dialogue: on
    # the documented machine kind all 5 start with a person of their own dialogue, 4 of 5
    # name exactly the reference's people, and 5 of 5 its place and day (after 20
    # rounds, of 256 held-out dialogues: people 59.8 %, place 100 %, day 98.8 %; after
    # 40, 93.0 / 100 / 100 %; docs/benchmarks.md "Offline demo"). The earlier demo,
    # trained from scratch, named the wrong people; the earlier span-corruption base
    # copied almost no place. The thresholds leave one example of margin for another
    # machine kind's rounding.
    first_person_right = [first_person(p) in people(r) for p, r in examples]
    assert sum(first_person_right) >= 4, examples
    slot_scores = load_script("score_demo_slots").slot_scores  # as docs/benchmarks.md scores them
    scores = [slot_scores(p, r) for p, r in examples]
    assert sum(s["place"] and s["day"] for s in scores) >= 4, examples
    assert sum(s["people"] and s["place"] and s["day"] for s in scores) >= 3, examples
    # The trained demo is usable from the CLI: its config names the shipped base by name
    # (model.name: demo-base), which `summarize` resolves again.
    dialogue = "Anna: can you lend me your drill on Friday?\nTom: sure, I'll bring it\nAnna: thanks!"
    used = subprocess.run([sys.executable, "-m", "fedjax_fm", "summarize", str(out), "--text", dialogue],
                          cwd=REPO, env=readme_environment(), capture_output=True, text=True)
    assert used.returncode == 0, used.stderr[-4000:]
    assert f"loaded round {rounds} of" in used.stderr and used.stdout.strip()
    if not same_kind:
        pytest.skip(f"params_sha256 is documented for {check['machine']} with {check['cpus']} CPUs of "
                    f"instruction sets {check['cpu_isa']}; this is {platform.machine()} with {os.cpu_count()} "
                    f"of {cpu['isa_signature']} ({cpu['model']})")
    assert summary["params_sha256"] == check["params_sha256"], (
        "the demo's fingerprint drifted from docs/benchmarks.md: re-measure the demo and update the "
        "'demo-check' line and the figures next to it")
