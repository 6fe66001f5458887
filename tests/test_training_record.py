"""The run layer shared by simulation and deployment: one record, one MFU, clean floors.

The deployment half runs without a network: two real ``DeviceClient``s train their
round (the code a SuperNode runs) and the ``DeployStrategy`` records it as Flower's
``aggregate_fit`` would, so the server's bookkeeping is the one under test.
"""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest
from flwr.common import FitIns

from fedjax_fm.config import load_config
from fedjax_fm.data.local_files import write_jsonl
from fedjax_fm.deploy.client import DeviceClient
from fedjax_fm.deploy.server import DeployStrategy, _RoundPlan
from fedjax_fm.deploy.wire import decode_tree, encode_tree, payload_bytes
from fedjax_fm.training.experiment import run_experiment
from fedjax_fm.training.report import write_report

REPO = Path(__file__).resolve().parents[1]
PEAK = 1.0e11  # declared peak FLOP/s, so that MFU is a number on any machine
CLIENTS = {"alice": 5, "bob": 7}

CONFIG = """\
seed: 5
model: {{name: tiny, init: random, tokenizer: byt5, vocab_size: 512}}
lora: {{rank: 4, alpha: 8.0, dropout: 0.0, target_modules: [q, v]}}
data:
  source: {{kind: client_folder, path: {folder}, eval_path: {eval}}}
  partition: {{method: natural}}
  max_input_length: 48
  max_target_length: 16
  packing: {{enabled: true, input_length: 96, target_length: 32}}  # devices pack their own data
federated:
  rounds: 1
  num_clients: 2
  clients_per_round: 2
  local_steps: 2
  local_epochs: null
  batch_size: 4
  local_optimizer: {{name: adamw, learning_rate: 1.0e-2}}
eval: {{every: 1, at_start: false, max_examples: 2, batch_size: 2, max_new_tokens: 4}}
energy: {{backend: constant, watts: 7.5, network: wifi5, peak_flops: {peak}}}
output: {{export: false, plots: false, progress: false}}
"""


def _examples(client: str, n: int) -> list[dict]:
    return [{"id": str(i), "dialogue": f"{client.title()}: note {i} about item {i * 7 % 5}. Ok.",
             "summary": f"{client} item {i * 7 % 5}"} for i in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("world")
    for client, n in CLIENTS.items():
        write_jsonl(tmp / "clients" / f"{client}.jsonl", _examples(client, n))
    write_jsonl(tmp / "eval.jsonl", _examples("eve", 2))
    config = tmp / "config.yaml"
    config.write_text(CONFIG.format(folder=tmp / "clients", eval=tmp / "eval.jsonl", peak=PEAK))
    return tmp, config


def _planned_round(names: list[str], nodes: dict[str, int], bytes_down_each: int = 0) -> _RoundPlan:
    """Round 0 as ``configure_fit`` would plan it: every device in ``names`` sampled and sent
    work, ``nodes`` the Flower node each was sent to."""
    return _RoundPlan(round_index=0, started=time.perf_counter(), sampled=names, sent=names,
                      bytes_down_each=bytes_down_each, absent=[], nodes=nodes, rejected=[])


def _proxy(node: int) -> SimpleNamespace:
    """What ``aggregate_fit`` reads of Flower's client proxy: its node id."""
    return SimpleNamespace(node_id=node, cid=str(node))


@pytest.fixture(scope="module")
def deployed(world) -> Path:
    """One deployed round: each device trains for real, the strategy records it."""
    tmp, config = world
    cfg = load_config(config)
    out = tmp / "deployed"
    strategy = DeployStrategy(cfg, out, list(CLIENTS), log=lambda message: None)
    payload = encode_tree(strategy.state.params)
    names = sorted(CLIENTS)
    strategy.plan = _planned_round(names, {}, payload_bytes(payload))
    updates = []
    for position, name in enumerate(names):
        device = DeviceClient(cfg, str(tmp / "clients"), name, log=lambda message: None)
        res = device.fit(FitIns(payload, {"round_index": 0, "seed": cfg.seed, "position": position,
                                          "overrides": ""}))
        updates.append((name, decode_tree(res.parameters, strategy.state.params), res))
    strategy._finish_round(updates, [], [])
    strategy.finish()
    return out


@pytest.fixture(scope="module")
def simulated(world) -> Path:
    tmp, config = world
    out = tmp / "simulated"
    run_experiment(load_config(config), out)
    return out


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_deploy_summary_has_the_simulation_totals(deployed, simulated):
    deploy_totals, sim_totals = _summary(deployed)["totals"], _summary(simulated)["totals"]
    assert set(sim_totals) <= set(deploy_totals)
    assert set(deploy_totals) - set(sim_totals) == {"bytes_up_sent", "bytes_down_sent"}
    for key in ("seconds", "joules", "compute_joules", "client_joules", "server_joules", "comm_joules"):
        assert deploy_totals[key] is not None and deploy_totals[key] > 0, key
    assert deploy_totals["compute_joules"] == pytest.approx(deploy_totals["client_joules"] + deploy_totals["server_joules"])
    # Both written by the same RunRecorder: the same core fields (a deployment has no data, examples or export).
    core = set(_summary(simulated)) - {"data", "examples", "export", "process_seconds"}
    assert core <= set(_summary(deployed))


def test_report_shows_compute_joules_and_total_seconds_of_a_deploy_run(deployed, tmp_path):
    report = write_report([deployed], tmp_path / "report").read_text()
    header, _, row = [line for line in report.splitlines() if line.startswith("|")][:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    totals = _summary(deployed)["totals"]
    assert cells["compute J"] == f"{totals['compute_joules']:.2f}"
    assert cells["total s"] == f"{totals['seconds']:.2f}"


def test_deploy_and_simulation_compute_mfu_the_same_way(deployed, simulated):
    """MFU = useful FLOPs / device-seconds / peak: Σ over the devices' reports, one call in simulation."""
    deployed_row = _rows(deployed)[-1]
    reports = deployed_row["client_reports"]
    assert len(reports) == 2 and all(r["peak_flops"] == PEAK for r in reports)
    flops, seconds = sum(r["model_flops"] for r in reports), sum(r["seconds"] for r in reports)
    assert deployed_row["model_flops"] == pytest.approx(flops)
    assert deployed_row["mfu"] == pytest.approx(flops / seconds / PEAK, rel=1e-12)
    # Not the mean of the devices' MFUs, unless they happened to run equally long.
    simulated_row = _rows(simulated)[-1]
    assert simulated_row["mfu"] == pytest.approx(
        simulated_row["model_flops"] / simulated_row["client_seconds"] / PEAK, rel=1e-12)
    # The same round on the same data: the same useful work, counted by the same function.
    assert simulated_row["model_flops"] == pytest.approx(deployed_row["model_flops"])
    assert simulated_row["tokens"] == pytest.approx(deployed_row["tokens"])


def test_importing_the_checkpoint_module_leaves_absl_logging_alone(tmp_path):
    code = (
        "import logging; logging.getLogger('absl').setLevel(logging.DEBUG)\n"
        "import numpy as np\n"
        "from fedjax_fm.training.checkpoint import CheckpointStore\n"
        "assert logging.getLogger('absl').level == logging.DEBUG, 'import'\n"
        f"store = CheckpointStore({str(tmp_path / 'ckpt')!r})\n"
        "store.save(1, {'w': np.ones(3, np.float32)}, [])\n"
        "store.close()\n"
        "assert logging.getLogger('absl').level == logging.DEBUG, 'use'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert logging.getLogger("absl").level is not None


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_no_module_imports_from_a_floor_above_it():
    package = REPO / "fedjax_fm"
    above = {"models": ("training", "deploy", "cli"), "fl": ("training", "deploy", "cli"),
             "data": ("training", "deploy", "cli"), "energy": ("training", "deploy", "cli"),
             "eval": ("training", "deploy", "cli"), "training": ("deploy", "cli")}
    offences = []
    for floor, forbidden in above.items():
        for path in sorted((package / floor).rglob("*.py")):
            for module in _imports(path):
                if any(module == f"fedjax_fm.{f}" or module.startswith(f"fedjax_fm.{f}.") for f in forbidden):
                    offences.append(f"{path.relative_to(REPO)} imports {module}")
    assert offences == []


def test_packed_device_round_equals_the_simulated_round(deployed, simulated):
    """Devices pack their own data with the simulation's packer: same rows, same work, same model."""
    d, s = _rows(deployed)[-1], _rows(simulated)[-1]
    assert d["padding_efficiency"] == pytest.approx(s["padding_efficiency"], rel=1e-12)
    assert 0 < s["padding_efficiency"] <= 1 and d["examples"] == s["examples"]
    assert _summary(deployed)["params_sha256"] == _summary(simulated)["params_sha256"]


def test_server_refuses_a_reply_for_another_round(world):
    """A reply that is not for the round the server runs (Flower delivering one late or twice)
    is refused with its reason, and the round goes on with the devices that answered it."""
    tmp, config = world
    cfg = load_config(config)
    strategy = DeployStrategy(cfg, tmp / "refusing", list(CLIENTS), log=lambda message: None)
    payload = encode_tree(strategy.state.params)
    names = sorted(CLIENTS)  # alice, bob
    nodes = {name: 100 + i for i, name in enumerate(names)}
    strategy.plan = _planned_round(names, nodes, payload_bytes(payload))
    results = []
    for position, (name, answered_round) in enumerate([("alice", 1), ("bob", 0)]):
        device = DeviceClient(cfg, str(tmp / "clients"), name, log=lambda message: None)
        res = device.fit(FitIns(payload, {"round_index": answered_round, "seed": cfg.seed, "position": position,
                                          "overrides": ""}))
        assert res.metrics["round_index"] == answered_round
        results.append((_proxy(nodes[name]), res))
    strategy.aggregate_fit(1, results, [])
    row = strategy.rows[-1]
    assert row["clients"] == 1 and [r["client_id"] for r in row["client_reports"]] == ["bob"]
    assert row["failed_clients"] == [
        {"client": "alice", "reason": "alice: replied for round index 1 while round index 0 runs; ignored"}]
    assert strategy.rounds_done == 1


@pytest.mark.parametrize("stray", ["another round", "another node"])
def test_a_secure_sum_holding_a_refused_reply_is_not_applied(world, tmp_path, stray):
    """Under SecAgg+ the server gets only the sum, which already holds a reply it refuses (one
    for another round, or one from a node not asked as that device): the round is recorded
    with every device failed and the model unchanged."""
    from flwr.common import Code, FitRes, Status

    tmp, config = world
    text = config.read_text().replace("num_clients: 2", "num_clients: 3").replace("clients_per_round: 2",
                                                                                "clients_per_round: 3")
    secure_config = tmp_path / "secure.yaml"
    secure_config.write_text(text + "deploy: {secure_aggregation: {enabled: true}}\n")
    cfg = load_config(secure_config)
    names = ["alice", "bob", "carol"]
    strategy = DeployStrategy(cfg, tmp_path / "out", names, log=lambda message: None)
    before = strategy.state.params
    nodes = {name: 100 + i for i, name in enumerate(names)}
    strategy.plan = _planned_round(names, nodes)
    sum_parameters = encode_tree(before)  # never read: the round is refused before it is decoded
    bob_round, bob_node = (2, nodes["bob"]) if stray == "another round" else (0, 999)
    replies = [("alice", 0, nodes["alice"]), ("bob", bob_round, bob_node), ("carol", 0, nodes["carol"])]
    results = [(_proxy(node),
                FitRes(Status(Code.OK, "ok"), sum_parameters, 4, {"client_id": name, "round_index": r}))
               for name, r, node in replies]
    strategy.aggregate_fit(1, results, [])
    row = strategy.rows[-1]
    assert row["clients"] == 0 and row["applied"] is False
    bob = ("bob: replied for round index 2 while round index 0 runs; ignored" if stray == "another round"
           else "node 999 answered as 'bob' without being asked as it; ignored")
    assert {f["client"]: f["reason"] for f in row["failed_clients"]} == {
        "alice": "alice: in a secure sum with a refused reply; not applied", "bob": bob,
        "carol": "carol: in a secure sum with a refused reply; not applied"}
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(strategy.state.params), jax.tree.leaves(before)))
