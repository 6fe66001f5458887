"""``fedjax-fm run`` in two local processes (``distributed:``): one output folder, the one-process
results, kill + ``--resume``, and a clear error when the processes cannot all join."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedjax_fm.config import load_config
from fedjax_fm.training.experiment import run_experiment

from test_distributed import free_port, two_process_env
from test_experiment_run import TINY_YAML

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600  # only stops a real hang

# test_experiment_run's tiny run, with 3 of 6 clients a round on the sharded backend
SHARDED_YAML = """\
base: run.yaml
federated: {num_clients: 6, clients_per_round: 3, backend: sharded}
output: {export: false, plots: false}
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cfg")
    (folder / "run.yaml").write_text(TINY_YAML.format(default=REPO / "configs" / "default.yaml"))
    path = folder / "tiny.yaml"
    path.write_text(SHARDED_YAML)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("xla_cache")


def _env(cache: Path) -> dict[str, str]:
    env = two_process_env()
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as tests/conftest.py
    return env


def _commands(config: Path, out: Path, *, processes: int = 2, started: int = 2, init_timeout: int = 120,
              resume: bool = False) -> list[list[str]]:
    section = (f"distributed={{coordinator_address: '127.0.0.1:{free_port()}', num_processes: {processes}, "
               f"initialization_timeout_s: {init_timeout}, heartbeat_timeout_s: 20}}")
    return [[sys.executable, "-m", "fedjax_fm", "run", str(config), "--out", str(out), "--quiet",
             "--set", section, "--set", f"distributed.process_id={i}"] + (["--resume"] if resume else [])
            for i in range(started)]


def _start(commands: list[list[str]], cache: Path, logs: Path) -> list[tuple[subprocess.Popen, Path]]:
    logs.mkdir(parents=True, exist_ok=True)
    started = []
    for i, command in enumerate(commands):
        log = logs / f"p{i}.log"
        started.append((subprocess.Popen(command, env=_env(cache), stdout=open(log.with_suffix(".out"), "w"),
                                         stderr=open(log, "w"), cwd=REPO), log))
    return started


def _finish(started: list[tuple[subprocess.Popen, Path]]) -> list[tuple[int, str, str]]:
    results = []
    try:
        for proc, log in started:
            proc.wait(timeout=TIMEOUT_S)
            results.append((proc.returncode, log.with_suffix(".out").read_text(), log.read_text()))
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.kill()
    return results


def _summary_line(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def _losses(out: Path) -> list:
    return [(r["round"], r.get("train_loss"), r.get("eval_loss")) for r in
            (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def two_process_run(tiny_config, cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    results = _finish(_start(_commands(tiny_config, root / "run"), cache, root / "logs"))
    return root / "run", results


def test_two_processes_write_one_folder_with_the_one_process_results(two_process_run, tiny_config, tmp_path):
    out, results = two_process_run
    for i, (code, stdout, stderr) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{stderr[-4000:]}"
    shas = [_summary_line(stdout)["params_sha256"] for _, stdout, _ in results]
    assert shas[0] == shas[1]
    assert sorted(p.name for p in out.parent.iterdir() if p.name != "logs") == ["run"]  # one output folder
    assert {"metrics.jsonl", "summary.json", "config.yaml", "checkpoints", "lineage.jsonl"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_sha256"] == shas[0]
    single = run_experiment(load_config(tiny_config), tmp_path / "single")  # one process, 4 devices
    assert _losses(out) == pytest.approx(_losses(tmp_path / "single"), abs=1e-5)
    assert single["rounds"] == summary["rounds"] == 4
    # Each process tokenised only the clients it fed (process 1 holds 1 of each round's 3
    # clients), yet process 0's lineage has every client's fingerprint, as one process's.
    assert summary["data"]["tokenised_on_demand"] == ["train", "eval"]
    assert single["data"]["tokenised_on_demand"] == []
    counts = [re.search(r"process (\d) of 2: tokenised (\d+) of (\d+) training examples", stderr)
              for _, _, stderr in results]
    assert all(counts), [stderr[-2000:] for _, _, stderr in results]
    assert 0 < int(counts[1].group(2)) < int(counts[1].group(3)) == 96
    lineage = lambda run: [(e["round"], e["clients"]) for e in  # noqa: E731
                           map(json.loads, (run / "lineage.jsonl").read_text().splitlines())]
    assert lineage(out) == lineage(tmp_path / "single")
    assert summary["data"]["truncation"]["train"]["num_examples"] <= 96


def test_sigkill_both_and_resume_gives_the_uninterrupted_result(two_process_run, tiny_config, cache, tmp_path):
    reference, results = two_process_run
    assert all(code == 0 for code, _, _ in results)
    out = tmp_path / "run"
    started = _start(_commands(tiny_config, out), cache, tmp_path / "logs")
    deadline = time.monotonic() + TIMEOUT_S
    while not (out / "checkpoints" / "2").is_dir():  # the first checkpoint (every 2 rounds)
        assert all(p.poll() is None for p, _ in started), [log.read_text()[-2000:] for _, log in started]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    for proc, _ in started:
        proc.send_signal(signal.SIGKILL)
    _finish(started)
    results = _finish(_start(_commands(tiny_config, out, resume=True), cache, tmp_path / "logs2"))
    for i, (code, _, stderr) in enumerate(results):
        assert code == 0, f"process {i} failed on --resume:\n{stderr[-4000:]}"
    shas = {_summary_line(stdout)["params_sha256"] for _, stdout, _ in results}
    assert shas == {json.loads((reference / "summary.json").read_text())["params_sha256"]}


def test_resume_with_another_process_count_is_refused(two_process_run, tiny_config, tmp_path):
    reference, _ = two_process_run
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(reference), str(out)], check=True)
    with pytest.raises(Exception, match="written by a run in 2 process"):
        run_experiment(load_config(tiny_config, ["federated.rounds=6"]), out, resume=True)


def test_more_processes_than_started_fail_with_a_clear_error(tiny_config, cache, tmp_path):
    results = _finish(_start(_commands(tiny_config, tmp_path / "run", processes=3, init_timeout=5),
                             cache, tmp_path / "logs"))
    for code, _, stderr in results:
        assert code == 2, stderr[-2000:]
        assert "could not join 3 processes" in stderr and "Check that every process was started" in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_process_that_dies_brings_the_run_down(tiny_config, cache, tmp_path):
    out = tmp_path / "run"
    commands = [c + ["--set", "federated.rounds=200"] for c in _commands(tiny_config, out)]
    started = _start(commands, cache, tmp_path / "logs")
    deadline = time.monotonic() + TIMEOUT_S
    while not (out / "checkpoints" / "2").is_dir():
        assert all(p.poll() is None for p, _ in started), [log.read_text()[-2000:] for _, log in started]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    started[1][0].send_signal(signal.SIGKILL)
    (code, _, stderr), _ = _finish(started)  # process 0 must not hang (heartbeat_timeout_s: 20)
    assert code != 0
    assert "Task 1 heartbeat timeout" in stderr and "JAX distributed service detected fatal errors" in stderr
