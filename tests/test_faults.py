"""Fault injection, driven through the command line as a user would (issue 17).

Each case is one test asserting the message (or the recovery): none may end in a
traceback or silently. The cases:

* checkpoints: a damaged newest checkpoint (truncated, overwritten, a file deleted) is
  moved aside to ``checkpoints/corrupt-<round>/`` and ``--resume`` ends with the
  uninterrupted ``params_sha256``; with every checkpoint damaged the error says what to
  do; SIGKILL at four points of a save, then ``--resume``, ends bit-identical;
* signals: SIGINT inside a round finishes and checkpoints it (exit 130), SIGTERM during
  set-up abandons it (exit 143); both say how to resume, and the resume is bit-identical;
* bad input: cyclic ``base:``, an ``--out`` that cannot be a folder, ``num_train: 0``,
  ragged CSV rows (at their real line), non-finite and negative hyper-parameters, a
  preset typo, an empty ``lora:`` section, malformed JSON, a missing field, too many
  clients for a natural partition, heavy truncation, ``skip_invalid`` (one warning,
  without source lines);
* rejected clients and skipped rounds on the console, in ``summary.json`` and ``report``;
* ``--resume`` of a finished run: unused ``eval.*`` changes refused, nothing rewritten.

Runs that must be killed or signalled are subprocesses (``python -m fedjax_fm run``);
errors raised before training run in this process through ``fedjax_fm.cli.main``.
Every run shares one persistent compilation cache, so only the first compiles.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedjax_fm.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]

FAULT_YAML = """\
base: {default}
seed: 0
model: {{name: tiny, init: random, tokenizer: train-sentencepiece, vocab_size: 256}}
lora: {{rank: 4, alpha: 8.0, target_modules: [q, v]}}
data:
  source: {{num_train: 96, num_eval: 8}}
  max_input_length: 64
  max_target_length: 48
federated: {{rounds: 4, num_clients: 4, clients_per_round: 2, local_steps: 2, batch_size: 4,
            server_optimizer: {{name: fedadam, learning_rate: 0.1, b1: 0.9, b2: 0.99, tau: 1.0e-2, variant: reddi}}}}
eval: {{every: 2, max_examples: 8, batch_size: 8, max_new_tokens: 8}}
checkpoint: {{every: 1, keep: 2}}
output: {{export: false, plots: false}}
"""

NOISE = ("Traceback", "Event loop is closed", "StepAlreadyExistsError")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "fault.yaml"
    path.write_text(FAULT_YAML.format(default=REPO / "configs" / "default.yaml"))
    return path


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_DEFAULT_MATMUL_PRECISION="highest", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop(_KILL_ENV, None)
    env.update(extra)
    return env


_KILL_ENV = "FEDJAX_FM_KILL_AT"


def _run(cache: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``fedjax-fm run ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "fedjax_fm", "run", *args], capture_output=True, text=True,
                          env=env or _env(cache), timeout=timeout, cwd=REPO)


def _sha(out: Path) -> str:
    return json.loads((out / "summary.json").read_text())["params_sha256"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _clean(stderr: str) -> None:
    for noise in NOISE:
        assert noise not in stderr, stderr[-3000:]


@pytest.fixture(scope="module")
def reference(config, compile_cache, tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted run: the params_sha256 every recovery must end with."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    done = _run(compile_cache, str(config), "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, _sha(out)


def _unfinished_copy(reference: Path, target: Path) -> Path:
    """The reference run as if killed after its last checkpoint, before summary.json."""
    shutil.copytree(reference, target)
    (target / "summary.json").unlink()
    return target


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """``fedjax-fm ARGV`` in this process: (exit code, stderr)."""
    code = cli_main(list(argv))
    return code, capsys.readouterr().err


# ------------------------------------------------------------------ checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _overwrite_4k(path: Path) -> None:
    with path.open("r+b") as f:
        f.write(b"\0" * 4096)


def _largest_file(step: Path) -> Path:
    return max((p for p in (step / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "overwrite-4k", "delete"])
def test_damaged_newest_checkpoint_is_moved_aside_and_resume_is_bit_identical(damage, reference, compile_cache, tmp_path,
                                                                              config):
    ref_out, ref_sha = reference
    out = _unfinished_copy(ref_out, tmp_path / "run")
    victim = _largest_file(out / "checkpoints" / "4")
    {"truncate": _truncate, "overwrite-4k": _overwrite_4k, "delete": Path.unlink}[damage](victim)
    done = _run(compile_cache, str(config), "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    _clean(done.stderr)
    assert "checkpoints/4 is unreadable" in done.stderr and "moved aside to" in done.stderr
    assert "resumed from" in done.stderr and "(round 3)" in done.stderr
    assert (out / "checkpoints" / "corrupt-4").is_dir()  # kept for inspection
    assert (out / "checkpoints" / "4" / "manifest.json").is_file()  # retrained and saved again
    assert _sha(out) == ref_sha
    assert [r["round"] for r in _rows(out)] == [0, 1, 2, 3, 4]


def test_every_checkpoint_damaged_says_what_to_do(reference, compile_cache, tmp_path, config):
    out = _unfinished_copy(reference[0], tmp_path / "run")
    for step in ("3", "4"):
        _truncate(_largest_file(out / "checkpoints" / step))
    done = _run(compile_cache, str(config), "--out", str(out), "--resume")
    assert done.returncode == 2
    _clean(done.stderr)
    assert "no checkpoint under" in done.stderr and "could be restored" in done.stderr
    assert "What to do" in done.stderr and "nothing was changed" in done.stderr and "--resume" in done.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3", "4"]  # left in place


@pytest.mark.parametrize("point", ["arrays", "meta", "manifest", "renamed"])
def test_sigkill_during_a_save_then_resume_is_bit_identical(point, reference, compile_cache, tmp_path, config):
    """The process kills itself (SIGKILL) at ``point`` of round 3's save (training/checkpoint.py)."""
    out = tmp_path / "run"
    killed = _run(compile_cache, str(config), "--out", str(out), env=_env(compile_cache, **{_KILL_ENV: f"{point}:3"}))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    if point == "renamed":
        assert "3" in steps  # complete and in place; the older ones not pruned yet
    else:
        assert "3" not in steps and ".tmp-3" in steps  # never a half checkpoint under a round's name
    done = _run(compile_cache, str(config), "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    _clean(done.stderr)
    assert "skipping checkpoint" not in done.stderr  # nothing damaged: the partial save was never a checkpoint
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())
    assert _sha(out) == reference[1]


# ------------------------------------------------------------------ signals


def _start(cache: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = Path(args[args.index("--out") + 1] + ".log")
    proc = subprocess.Popen([sys.executable, "-m", "fedjax_fm", "run", *args], stdout=subprocess.DEVNULL,
                            stderr=log.open("w"), env=_env(cache), cwd=REPO)
    return proc, log


def _wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{text!r} not seen in {timeout} s"
        time.sleep(0.05)


def test_sigint_finishes_the_round_in_flight_and_says_how_to_resume(reference, compile_cache, tmp_path, config):
    out = tmp_path / "run"
    proc, log = _start(compile_cache, str(config), "--out", str(out))
    _wait_for(proc, log, "round 1/4")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    stderr = log.read_text()
    _clean(stderr)
    message = [line for line in stderr.splitlines() if "interrupted by SIGINT" in line]
    assert len(message) == 1, stderr[-2000:]
    assert f"--out {out} --resume" in message[0]
    assert "finished and checkpointed" in message[0] or "abandoned" in message[0] or "no round" in message[0]
    rows = _rows(out)  # whole rows, consecutive rounds
    assert [r["round"] for r in rows] == list(range(len(rows)))
    if "finished and checkpointed" in message[0]:
        finished = int(message[0].split("round ")[1].split("/")[0])
        assert str(finished) in {p.name for p in (out / "checkpoints").iterdir()}
    done = _run(compile_cache, str(config), "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _sha(out) == reference[1]


def test_sigterm_during_set_up_abandons_it_and_exits_143(reference, compile_cache, tmp_path, config):
    out = tmp_path / "run"
    proc, log = _start(compile_cache, str(config), "--out", str(out))
    _wait_for(proc, log, "fedjax-fm run ->")  # past the config: the handlers are installed
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    stderr = log.read_text()
    _clean(stderr)
    line = next(line for line in stderr.splitlines() if "interrupted by SIGTERM" in line)
    assert "--resume" in line
    done = _run(compile_cache, str(config), "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _sha(out) == reference[1]


# ------------------------------------------------------------------ bad input


def _error(capsys, *argv: str) -> str:
    """Runs ``fedjax-fm run ARGV`` expecting the one-line error (exit 2); returns stderr."""
    code, err = _cli(capsys, "run", *argv)
    assert code == 2, err
    assert "Traceback" not in err
    assert "fedjax-fm run: error: " in err, err
    return err


@pytest.fixture(autouse=True)
def _restore_warning_format():
    import warnings

    saved = warnings.formatwarning
    yield
    warnings.formatwarning = saved


def test_cyclic_base_is_an_error_naming_the_cycle(capsys, tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    err = _error(capsys, str(tmp_path / "a.yaml"), "--out", str(tmp_path / "o"))
    assert "base: makes a cycle" in err and "a.yaml -> " in err and "b.yaml" in err


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_out_that_cannot_be_a_folder(where, capsys, tmp_path, config):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    out = blocker if where == "a file" else blocker / "run"
    err = _error(capsys, str(config), "--out", str(out))
    assert f"--out {out}" in err and "not a folder" in err and "choose another --out" in err


def test_num_train_zero_names_the_key(capsys, tmp_path, config):
    err = _error(capsys, str(config), "--out", str(tmp_path / "o"), "--set", "data.source.num_train=0")
    assert "data.source.num_train must be positive" in err


def _file_source(path: Path, *extra: str) -> tuple[str, ...]:
    return ("--set", "data.source.kind=file", "--set", f"data.source.path={path}", "--set", "data.source.eval_fraction=0.25",
            "--set", "federated.num_clients=1", "--set", "federated.clients_per_round=1", "--set",
            "data.partition.method=iid", *extra)


@pytest.mark.parametrize("row, line, cells", [
    ('b,"A: lunch?\nB: sure",Lunch.,EXTRA', 4, 4),  # an extra cell, no longer dropped
    ('b,"A: lunch?\nB: sure"', 4, 2),  # a missing cell
])
def test_ragged_csv_row_is_reported_at_its_real_line(row, line, cells, capsys, tmp_path, config):
    path = tmp_path / "data.csv"
    # The first dialogue spans lines 2-3, so the bad row starts on line 4.
    path.write_text(f'id,dialogue,summary\na,"A: hi\nB: hello",Greeting.\n{row}\nc,"A: x\nB: y",Z.\n')
    err = _error(capsys, str(config), "--out", str(tmp_path / "o"), *_file_source(path))
    assert f"{path}: line {line}: {cells} cell(s) where the header has 3" in err


@pytest.mark.parametrize("key, value", [
    ("federated.local_optimizer.learning_rate", ".nan"),
    ("federated.local_optimizer.learning_rate", ".inf"),
    ("federated.server_optimizer.tau", ".nan"),
])
def test_non_finite_hyper_parameter_names_the_key(key, value, capsys, tmp_path, config):
    err = _error(capsys, str(config), "--out", str(tmp_path / "o"), "--set", f"{key}={value}")
    assert f"{key}: expected a finite number" in err


@pytest.mark.parametrize("section", ["local_optimizer", "server_optimizer"])
def test_negative_weight_decay_names_the_key(section, capsys, tmp_path, config):
    err = _error(capsys, str(config), "--out", str(tmp_path / "o"), "--set", f"federated.{section}.weight_decay=-0.1")
    assert f"federated.{section}.weight_decay must not be negative" in err


def test_preset_typo_gets_a_did_you_mean(capsys, tmp_path, config):
    err = _error(capsys, str(config), "--out", str(tmp_path / "o"), "--set", "model.name=tinyy")
    assert "model.name" in err and "did you mean 'tiny'?" in err


def test_empty_lora_section_is_an_error_with_the_line(capsys, tmp_path, config):
    path = tmp_path / "nolora.yaml"
    path.write_text(f"base: {config}\nlora:\n  # rank: 4\n  # alpha: 8.0\n")
    err = _error(capsys, str(path), "--out", str(tmp_path / "o"))
    assert f"{path}:2: the lora: section is empty" in err and "lora: null" in err


def test_malformed_json_message_is_whole(capsys, tmp_path, config):
    path = tmp_path / "data.json"
    path.write_text('[{"id": "a", "dialogue": "x", "summary": "y"},\n {"id": "b", "dialogue": "x" "summary": "y"}]')
    err = _error(capsys, str(config), "--out", str(tmp_path / "o"), *_file_source(path))
    assert f"{path}: malformed JSON at line 2, column 30: expecting ',' delimiter near " in err
    assert '"x" "summary"' in err


@pytest.mark.parametrize("field, key", [("dialogue", "input_field"), ("summary", "target_field")])
def test_missing_field_names_the_config_key(field, key, capsys, tmp_path, config):
    record = {"id": "a", "dialogue": "hi", "summary": "y"}
    del record[field]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    err = _error(capsys, str(config), "--out", str(tmp_path / "o"), *_file_source(path))
    assert f"missing field(s) ['{field}']" in err and f"set data.source.{key}" in err


def test_natural_partition_client_count_names_federated_num_clients(capsys, tmp_path, config):
    folder = tmp_path / "clients"
    folder.mkdir()
    for client in ("alice", "bob"):
        (folder / f"{client}.jsonl").write_text("".join(
            json.dumps({"id": f"{client}{i}", "dialogue": f"A: hi {i}", "summary": "Hi."}) + "\n" for i in range(4)))
    err = _error(capsys, str(config), "--out", str(tmp_path / "o"), "--set", "data.source.kind=client_folder",
                 "--set", f"data.source.path={folder}", "--set", "data.source.eval_fraction=0.25",
                 "--set", "data.partition.method=natural", "--set", "federated.num_clients=3",
                 "--set", "federated.clients_per_round=1")
    assert "asked for 3 clients (federated.num_clients), the data has 2" in err
    assert "set federated.num_clients to at most 2" in err


@pytest.fixture(scope="module")
def skip_invalid_run(compile_cache, config, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("skip")
    path = tmp / "data.jsonl"
    good = [json.dumps({"id": f"e{i}", "dialogue": f"A: hi {i}\nB: hello", "summary": "Greeting."}) for i in range(8)]
    path.write_text("\n".join(good[:4] + ["not json"] + good[4:]) + "\n")
    done = _run(compile_cache, str(config), "--out", str(tmp / "o"), "--quiet", *_file_source(path, "--set", "data.source.skip_invalid=true",
                "--set", "federated.rounds=1", "--set", "eval.at_start=false"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr, path


def test_skip_invalid_is_warned_once(skip_invalid_run):
    stderr, path = skip_invalid_run
    assert stderr.count("skipped 1 invalid record(s)") == 1, stderr
    assert f"{path}: malformed JSON on line 5" in stderr


def test_warnings_show_without_their_source_line(skip_invalid_run):
    stderr, _ = skip_invalid_run
    assert "warning: " in stderr
    assert "warnings.warn(" not in stderr and "local_files.py" not in stderr and "UserWarning" not in stderr


def test_heavy_truncation_is_warned_with_counts(compile_cache, config, tmp_path):
    done = _run(compile_cache, str(config), "--out", str(tmp_path / "o"), "--quiet", "--set", "data.max_input_length=4",
                "--set", "federated.rounds=1", "--set", "eval.at_start=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: data.max_input_length=4 truncates 96 of 96 train inputs (100%" in done.stderr
    assert "truncates 8 of 8 eval inputs" in done.stderr and "raise data.max_input_length" in done.stderr


# ------------------------------------------------------------------ poisoned clients, finished runs


def test_rejected_clients_and_skipped_rounds_are_shown_and_counted(compile_cache, config, tmp_path, capsys):
    out = tmp_path / "poisoned"
    # Full fine-tuning with SGD at 1e38 overflows every client's update: all rejected.
    done = _run(compile_cache, str(config), "--out", str(out), "--set", "lora=null", "--set", "federated.rounds=2",
                "--set", "federated.local_optimizer.name=sgd", "--set", "federated.local_optimizer.learning_rate=1e38",
                "--set", "eval.at_start=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: round 1: 2 of 2 client updates rejected (non-finite); no update applied" in done.stderr
    assert "federated.min_clients=1" in done.stderr
    assert "over the run 4 client update(s) were rejected as non-finite and 2 round(s) applied no update" in done.stderr
    totals = json.loads((out / "summary.json").read_text())["totals"]
    assert totals["rejected_clients"] == 4 and totals["skipped_rounds"] == 2
    code, _ = _cli(capsys, "report", str(out), "--out", str(tmp_path / "report"))
    assert code == 0
    table = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| run |"))
    row = next(line for line in table.splitlines() if line.startswith("| poisoned |"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["rejected clients"] == "4" and cells["skipped rounds"] == "2"


def test_resume_of_a_finished_run_refuses_unused_eval_changes_and_rewrites_nothing(reference, compile_cache, tmp_path,
                                                                                  config):
    out = tmp_path / "finished"
    shutil.copytree(reference[0], out)
    before = {name: (out / name).read_bytes() for name in ("config.yaml", "summary.json", "metrics.jsonl")}
    changed = _run(compile_cache, str(config), "--out", str(out), "--resume", "--set", "eval.max_examples=4")
    assert changed.returncode == 2
    _clean(changed.stderr)
    assert "already completed its 4 rounds" in changed.stderr and "eval.max_examples: 8 -> 4" in changed.stderr
    same = _run(compile_cache, str(config), "--out", str(out), "--resume")
    assert same.returncode == 0, same.stderr[-3000:]
    assert "already completed its 4 rounds: nothing to do" in same.stderr
    assert json.loads(same.stdout)["params_sha256"] == reference[1]
    after = {name: (out / name).read_bytes() for name in before}
    assert after == before  # config.yaml not overwritten, summary.json keeps its examples
    assert json.loads(after["summary.json"])["examples"]


def test_graceful_stop_defers_inside_a_round_and_a_second_signal_abandons():
    from fedjax_fm.training.interrupt import GracefulStop, RunInterrupted

    with GracefulStop() as stop:
        stop.deferring = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested == signal.SIGTERM  # deferred: the round goes on
        with pytest.raises(RunInterrupted) as second:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert second.value.exit_code == 143 and not second.value.finished
        stop.deferring, stop.requested = False, None
        with pytest.raises(RunInterrupted) as outside:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert outside.value.exit_code == 130
