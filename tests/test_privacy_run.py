"""Issue 13 in the run layer: DP-FedAvg as a configured algorithm, lineage, per-client quality, model card.

One DP run (module fixture: Poisson sampling, adaptive clipping, LoRA, sequential,
per-client evaluation every 2 rounds) is the reference; a second is killed with
SIGKILL after its first checkpoint and resumed, and must end with the same
parameters, the same ε trajectory and a byte-identical lineage.jsonl. The lineage
command is checked through the CLI on the reference and on one-byte edits.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fedjax_fm import fl
from fedjax_fm.config import ConfigError, load_config
from fedjax_fm.training.experiment import run_experiment
from fedjax_fm.training.privacy import RunPrivacy
from fedjax_fm.training.record import METRIC_FIELDS

from test_experiment_run import REPO, TINY_YAML, _cli, _subprocess_env

DP_SETS = [
    "federated.dp.noise_multiplier=0.8",
    "federated.dp.clip_norm=0.05",
    "federated.dp.adaptive_clipping.count_stddev=1.0",
    "eval.per_client_every=2",
]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML.format(default=REPO / "configs" / "default.yaml"))
    return path


@pytest.fixture(scope="module")
def dp_run(tiny_config, compile_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dp"
    summary = run_experiment(load_config(tiny_config, DP_SETS), out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, summary, rows


def _lineage_verify(run_dir: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cli("lineage", "verify", str(run_dir)), env=_subprocess_env(cache), capture_output=True,
                          cwd=REPO, timeout=120)


def test_dp_run_reports_epsilon_every_round(dp_run):
    out, summary, rows = dp_run
    trained = [r for r in rows if r["round"] > 0]
    assert all(set(METRIC_FIELDS) <= set(r) for r in rows)
    population = summary["data"]["partition"]["num_clients"]
    privacy = summary["privacy"]
    q = 2 / population  # default rate: clients_per_round / N
    assert privacy["sampling"] == "poisson" and privacy["sampling_rate"] == pytest.approx(q)
    for r in trained:  # ε at δ after every round = dp_accounting's answer for that many rounds
        expected = fl.epsilon(0.8, "poisson", q=q, rounds=r["round"], delta=privacy["delta"])
        assert r["dp_epsilon"] == pytest.approx(expected, rel=1e-12)
        assert r["dp_delta"] == privacy["delta"] < 1 / population
    assert [r["dp_epsilon"] for r in trained] == sorted(r["dp_epsilon"] for r in trained)
    assert privacy["epsilon"] == trained[-1]["dp_epsilon"] and privacy["rounds"] == 4
    # Adaptive clipping: C moves, and it is the C of the state (next round starts from it).
    clips = [r["dp_clip_norm"] for r in trained]
    assert clips[0] == pytest.approx(0.05) and len(set(clips)) > 1
    # Poisson: the realised number of clients varies around q·N; rows count real clients only.
    assert all(0 <= r["clients"] <= population for r in trained)


def test_per_client_quality_in_rows_summary_and_plots(dp_run):
    out, summary, rows = dp_run
    evaluated = [r for r in rows if r["per_client"] is not None]
    assert [r["round"] for r in evaluated] == [2, 4]
    last = evaluated[-1]
    table = last["per_client"]
    assert len(table) == summary["data"]["partition"]["num_clients"]
    values = [c["rougeL"] for c in table]
    assert values == sorted(values)  # worst first
    assert last["client_rougeL_mean"] == pytest.approx(np.mean(values))
    assert last["client_rougeL_std"] == pytest.approx(np.std(values))
    assert last["client_rougeL_worst_decile"] == pytest.approx(values[0])  # ⌈4/10⌉ = 1 client
    assert summary["per_client"]["round"] == 4 and summary["per_client"]["per_client"] == table
    assert (out / "plots" / "per_client.png").is_file()


def test_summary_carries_the_environment_of_the_lineage(dp_run):
    out, summary, _ = dp_run
    first = json.loads((out / "lineage.jsonl").read_text().splitlines()[0])
    assert summary["environment"] == first["environment"]
    assert summary["lineage"]["last_entry_hash"] == json.loads((out / "lineage.jsonl").read_text().splitlines()[-1])["entry_hash"]


def test_model_card_names_the_right_figures(dp_run):
    out, summary, _ = dp_run
    card = (out / "export" / "README.md").read_text()
    assert f"ε = {summary['privacy']['epsilon']:.4g}" in card
    assert f"δ = {summary['privacy']['delta']:.3g}" in card
    assert summary["params_sha256"] in card and summary["lineage"]["last_entry_hash"] in card
    assert f"worst decile {summary['per_client']['client_rougeL_worst_decile']:.4g}" in card
    assert f"{summary['totals']['bytes_up']:.4g} bytes up" in card
    assert "modelled (network profile `wifi5`" in card
    assert f"source: {summary['energy_source']}" in card
    assert "`tiny` (random initialisation)" in card and "lora(r=4)" in card


def test_lineage_verify_cli_passes_then_fails_on_one_byte_edits(dp_run, compile_cache, tmp_path):
    out, _, _ = dp_run
    ok = _lineage_verify(out, compile_cache)
    assert ok.returncode == 0, ok.stderr.decode()[-2000:]
    assert b"lineage ok: 4 entries" in ok.stdout

    edited = tmp_path / "edited_lineage"
    shutil.copytree(out, edited)
    path = edited / "lineage.jsonl"
    data = bytearray(path.read_bytes())
    at = data.index(b'"num_examples":') + len(b'"num_examples":')
    data[at] = ord("9") if data[at] != ord("9") else ord("8")
    path.write_bytes(bytes(data))
    bad = _lineage_verify(edited, compile_cache)
    assert bad.returncode == 1 and b"line 1 (round 1)" in bad.stderr, bad.stderr

    edited = tmp_path / "edited_params"
    shutil.copytree(out, edited)
    path = edited / "final_params.msgpack"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of the last float
    path.write_bytes(bytes(data))
    bad = _lineage_verify(edited, compile_cache)
    assert bad.returncode == 1 and b"final parameters" in bad.stderr, bad.stderr


def test_sigkill_and_resume_keeps_epsilon_and_lineage(dp_run, tiny_config, compile_cache, tmp_path):
    reference_dir, reference, reference_rows = dp_run
    out = tmp_path / "killed"
    env = _subprocess_env(compile_cache)
    args = _cli("run", str(tiny_config), "--out", str(out), *[a for s in DP_SETS for a in ("--set", s)])
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    first_checkpoint = out / "checkpoints" / "2"
    deadline = time.monotonic() + 300
    while not first_checkpoint.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert b"resumed from" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["params_sha256"] == reference["params_sha256"]
    assert [r["dp_epsilon"] for r in rows] == [r["dp_epsilon"] for r in reference_rows]
    assert [r["dp_clip_norm"] for r in rows] == [r["dp_clip_norm"] for r in reference_rows]
    assert (out / "lineage.jsonl").read_bytes() == (reference_dir / "lineage.jsonl").read_bytes()


def test_full_fine_tuning_vmapped_fixed_sampling(tiny_config, compile_cache, tmp_path):
    cfg = load_config(tiny_config, [
        "lora=null", "federated.backend=vmap", "federated.rounds=2", "federated.dp.sampling=fixed",
        "federated.dp.noise_multiplier=1.0", "federated.dp.target_epsilon=1000", "eval.at_start=false",
        "output.export=false", "output.plots=false",
    ])
    summary = run_experiment(cfg, tmp_path / "full")
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    population = summary["data"]["partition"]["num_clients"]
    assert summary["mode"] == "full" and [r["clients"] for r in rows] == [2, 2]
    expected = fl.epsilon(1.0, "fixed", clients_per_round=2, population=population, rounds=2,
                          delta=summary["privacy"]["delta"])
    assert summary["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert summary["lineage"]["entries"] == 2


def test_target_epsilon_stops_the_run(tiny_config, compile_cache, tmp_path):
    cfg = load_config(tiny_config, ["federated.dp.noise_multiplier=1.0", "eval.at_start=false",
                                    "output.export=false", "output.plots=false", "federated.dp.target_epsilon=6.0",
                                    "checkpoint.every=3"])
    privacy = RunPrivacy(cfg, 4)
    target_rounds = privacy.last_round
    assert 0 < target_rounds < 4, "pick a target that stops this config early"
    summary = run_experiment(cfg, tmp_path / "stop")
    assert summary["rounds"] == target_rounds and summary["privacy"]["stopped_at_target"]
    checkpoints = sorted(int(p.name) for p in (tmp_path / "stop" / "checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints[-1] == target_rounds  # the last round is checkpointed although off the interval
    assert summary["privacy"]["epsilon"] <= 6.0
    assert fl.epsilon(1.0, "poisson", q=0.5, rounds=target_rounds + 1, delta=privacy.delta) > 6.0


@pytest.mark.parametrize("sets, message", [
    (["federated.weighting=examples"], "federated.weighting must be 'uniform'"),
    (["federated.dp.delta=0.3"], "federated.dp.delta must be in"),
    (["federated.dp.sampling=fixed", "federated.dp.accountant=pld"], "does not support federated.dp.sampling 'fixed'"),
    (["federated.dp.sampling=shuffled"], "federated.dp.sampling must be one of"),
    (["federated.dp.noise_multiplier=0"], "without noise"),
    (["federated.min_clients=2"], "federated.min_clients must be 1"),
    (["federated.dp.adaptive_clipping.count_stddev=0.1"], "count_stddev must exceed"),
])
def test_refused_dp_configs(tiny_config, sets, message):
    cfg = load_config(tiny_config, ["federated.dp.noise_multiplier=1.0", *sets])
    with pytest.raises(ConfigError, match=message) as error:
        RunPrivacy.from_config(cfg, 4)
    assert str(error.value).startswith("federated.dp: refused: ")


def test_refused_config_from_the_cli(tiny_config, compile_cache, tmp_path):
    result = subprocess.run(
        _cli("run", str(tiny_config), "--out", str(tmp_path / "x"), "--set", "federated.dp.noise_multiplier=1",
             "--set", "federated.weighting=examples"),
        env=_subprocess_env(compile_cache), capture_output=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and b"federated.weighting must be 'uniform'" in result.stderr


def test_dp_off_is_unchanged(tiny_config):
    cfg = load_config(tiny_config)
    assert cfg.federated.dp is None and RunPrivacy.from_config(cfg, 4) is None


def test_report_shows_epsilon_and_per_client_spread(dp_run, tmp_path):
    from fedjax_fm.training.report import write_report

    out, summary, _ = dp_run
    text = write_report([out], tmp_path / "report").read_text()
    header, _, row = [line for line in text.splitlines() if line.startswith("|")][:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    privacy, per_client = summary["privacy"], summary["per_client"]
    assert cells["ε (δ)"] == f"{privacy['epsilon']:.2f} ({privacy['delta']:.2g})"
    assert cells["per-client ROUGE-L mean / worst decile / std"].startswith(f"{per_client['client_rougeL_mean']:.2f} / ")
    assert (tmp_path / "report" / "dp_epsilon.png").is_file()


def test_deploy_refuses_dp_without_secure_aggregation(tiny_config):
    """DP in a deployment needs SecAgg+ (devices clip inside it, the server noises the sum):
    without it the server would see each device's update, so the config is refused."""
    from fedjax_fm.deploy.assemble import check_deployable

    cfg = load_config(tiny_config, ["model.tokenizer=byt5", "federated.dp.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="federated.dp needs deploy.secure_aggregation.enabled: true"):
        check_deployable(cfg)
