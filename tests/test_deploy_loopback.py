"""Loopback Flower deployment: one server and three device processes on 127.0.0.1.

* equivalence: the deployed run's global parameters equal the simulation's
  (``fl.FederatedAlgorithm`` with the same pieces), and a restarted server resumes
  from its checkpoint;
* a device killed mid-round and one returning NaN: the round completes with the
  remaining device and both are reported;
* TLS: a device trusting another CA is refused.

Every process is started with a timeout and killed in ``finally``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

CLIENTS = ("alice", "bob", "carol")
SIZES = {"alice": 5, "bob": 7, "carol": 6}
PROCESS_TIMEOUT_S = 150

CONFIG = """\
seed: 3
model: {{name: tiny, init: random, tokenizer: byt5, vocab_size: 512, dtype: float32}}
lora: {{rank: 4, alpha: 8.0, dropout: 0.0, target_modules: [q, v]}}
data:
  source: {{kind: client_folder, path: {folder}, eval_path: {eval}}}
  partition: {{method: natural}}
  prompt_template: "summarize: {{dialogue}}"
  max_input_length: 48
  max_target_length: 16
federated:
  rounds: {rounds}
  num_clients: 3
  clients_per_round: 3
  min_clients: 1
  local_steps: 2
  local_epochs: null
  batch_size: 4
  local_optimizer: {{name: adamw, learning_rate: 1.0e-2}}
  server_optimizer: {{name: fedadam, learning_rate: 5.0e-2, b1: 0.9, b2: 0.99, tau: 1.0e-2, variant: reddi}}
eval: {{every: 1, at_start: false, max_examples: 2, batch_size: 2, max_new_tokens: 4}}
energy: {{backend: constant, watts: 7.5, network: wifi5}}
checkpoint: {{every: 1, keep: 3}}
output: {{export: false, plots: false, progress: false}}
"""


def _examples(client: str, n: int) -> list[dict]:
    return [{"id": str(i), "dialogue": f"{client.title()}: note {i} about item {i * 7 % 5}. Ok.",
             "summary": f"{client} item {i * 7 % 5}"} for i in range(n)]


def _write_world(tmp: Path, rounds: int) -> tuple[Path, dict[str, Path]]:
    """The config, the pooled client folder (simulation) and one folder per device."""
    from fedjax_fm.data.local_files import write_jsonl

    pooled = tmp / "clients"
    devices = {}
    for client in CLIENTS:
        write_jsonl(pooled / f"{client}.jsonl", _examples(client, SIZES[client]))
        devices[client] = tmp / "devices" / client
        devices[client].mkdir(parents=True)
        shutil.copy(pooled / f"{client}.jsonl", devices[client] / f"{client}.jsonl")
    write_jsonl(tmp / "eval.jsonl", _examples("eve", 2))
    config = tmp / "config.yaml"
    config.write_text(CONFIG.format(folder=pooled, eval=tmp / "eval.jsonl", rounds=rounds))
    return config, devices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", **extra)
    return env


def _start(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedjax_fm", "deploy", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env=_env(**env), cwd=Path(__file__).resolve().parents[1])


def _deploy(tmp: Path, config: Path, devices: dict[str, Path], out: Path, *, extra_server=(), extra_client=(),
            client_env=None, tag="run") -> tuple[int, dict[str, int | None]]:
    """Runs a server and one process per device to the end; returns their exit codes."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["server"] = _start(["server", str(config), "--out", str(out), "--clients", ",".join(CLIENTS),
                                  "--address", address, "--wait", "90", "--round-timeout", "90", *extra_server],
                                 tmp / f"{tag}-server.log")
        for client, folder in devices.items():
            procs[client] = _start(["client", str(config), "--data", str(folder), "--server", address,
                                    "--max-wait", "120", *extra_client], tmp / f"{tag}-{client}.log",
                                   **(client_env or {}).get(client, {}))
        server_code = procs["server"].wait(timeout=PROCESS_TIMEOUT_S)
        codes = {}
        for client in devices:
            try:
                codes[client] = procs[client].wait(timeout=30)
            except subprocess.TimeoutExpired:
                codes[client] = None
        return server_code, codes
    except subprocess.TimeoutExpired:
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(tmp.glob(f"{tag}-*.log")))
        pytest.fail(f"deployment did not finish in {PROCESS_TIMEOUT_S} s:\n{logs}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _logs(tmp: Path, tag: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(tmp.glob(f"{tag}-*.log")))


def _simulate(config: Path, rounds: int):
    """The simulation's server state after ``rounds`` rounds (the same pieces as ``fedjax-fm run``)."""
    from fedjax_fm import fl
    from fedjax_fm import run_setup as setup
    from fedjax_fm.config import load_config

    cfg = load_config(config)
    tokenizer = setup.build_tokenizer(cfg, config.parent, lambda: [])
    data = setup.build_data(cfg, tokenizer)
    assert data.client_ids == list(CLIENTS)
    model, variables = setup.build_model(cfg, tokenizer)
    trainable, frozen = fl.split_variables(variables, fl.trainable_collections(True))
    algorithm = setup.build_algorithm(cfg, model)
    state = algorithm.init(trainable, cfg.seed)
    for r in range(rounds):
        ids = fl.sample_clients(cfg.seed, r, data.num_clients, cfg.federated.clients_per_round)
        state, _ = algorithm.round(state, frozen, data.clients_round_batches([int(i) for i in ids], r), ids)
    return state


def _param_shapes(config: Path) -> list[dict]:
    """Shapes of the tiny model's base parameters (what full fine-tuning sends)."""
    from fedjax_fm import run_setup as setup
    from fedjax_fm.config import load_config
    from fedjax_fm.fingerprint import named_leaves

    cfg = load_config(config, ["lora=null"])
    _, variables = setup.build_model(cfg, None)
    return [{"name": n, "shape": list(np.shape(x))} for n, x in named_leaves(variables["params"])]


def _restore(out: Path, template):
    from fedjax_fm.checkpoint import CheckpointStore

    store = CheckpointStore(out / "checkpoints")
    try:
        return store.restore_latest(template)
    finally:
        store.close()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loopback_equals_simulation_and_resumes(tmp_path):
    """Round 1 deployed, server stopped; round 2 by a restarted server (--resume): equals 2 simulated rounds."""
    config, devices = _write_world(tmp_path, rounds=2)
    out = tmp_path / "deployed"
    code, codes = _deploy(tmp_path, config, devices, out, extra_server=["--set", "federated.rounds=1"],
                          extra_client=["--set", "federated.rounds=1"], tag="first")
    assert code == 0, _logs(tmp_path, "first")
    code, codes = _deploy(tmp_path, config, devices, out, extra_server=["--resume"], tag="second")
    assert code == 0, _logs(tmp_path, "second")
    assert "resumed from" in (tmp_path / "second-server.log").read_text()

    expected = _simulate(config, rounds=2)
    restored = _restore(out, expected)
    assert restored.round == 2
    got, want = jax.device_get(restored.state.params), jax.device_get(expected.params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6), got, want)
    assert not jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), want, jax.device_get(
        _simulate(config, rounds=0).params))), "training moved nothing: the comparison would be vacuous"

    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["clients"] == 3 and row["valid_clients"] == 3 and row["applied"] is True
        assert row["failed_clients"] == []
        # Bytes actually sent (payload incl. the name header) next to the modelled pytree bytes.
        assert row["bytes_up_sent"] > row["bytes_up"] > 0
        assert row["bytes_down_sent"] >= row["bytes_down"] > 0
        assert row["tokens"] > 0 and row["client_seconds"] > 0
        assert row["client_joules"] == pytest.approx(7.5 * row["client_seconds"], rel=0.2)  # constant-power estimate
        assert row["energy_is_estimate"] is True
        assert sorted(r["client_id"] for r in row["client_reports"]) == list(CLIENTS)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["params_sha256"]) == 64


def test_device_killed_and_nan_update_do_not_break_the_round(tmp_path):
    """Round 2: carol is SIGKILLed mid-training, bob sends NaN; alice's update is applied; both reported.

    Run with full fine-tuning (``lora=null``): the whole ``params`` collection travels."""
    config, devices = _write_world(tmp_path, rounds=2)
    out = tmp_path / "deployed"
    env = {"carol": {"FEDJAX_FM_DEPLOY_CRASH_AT_ROUND": "2"}, "bob": {"FEDJAX_FM_DEPLOY_NAN_AT_ROUND": "2"}}
    full = ["--set", "lora=null"]
    code, codes = _deploy(tmp_path, config, devices, out, client_env=env, tag="faults", extra_server=full,
                          extra_client=full)
    assert code == 0, _logs(tmp_path, "faults")
    assert codes["carol"] not in (0, None)  # it really died
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2], _logs(tmp_path, "faults")
    assert rows[0]["valid_clients"] == 3 and rows[0]["failed_clients"] == []
    full_bytes = 4 * sum(int(np.prod(r["shape"])) for r in _param_shapes(config))
    assert rows[0]["bytes_up"] == 3 * full_bytes < rows[0]["bytes_up_sent"]
    second = rows[1]
    assert [f["client"] for f in second["failed_clients"]] == ["carol"]
    assert second["nonfinite_clients"] == ["bob"]
    assert second["clients"] == 2 and second["valid_clients"] == 1 and second["applied"] is True
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def _write_ca(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (the openssl recipe of docs/deploy.md)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, signer, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, [(x509.BasicConstraints(ca=True, path_length=None), True)])
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]), ca_name, server_key, ca_key, [
        (x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
         False)])
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


def test_tls_refuses_a_device_that_trusts_another_ca(tmp_path):
    """TLS on: alice (right CA) trains; carol (another CA) fails the TLS handshake and never
    joins; bob (right CA, not in --clients) connects but is given no work."""
    config, devices = _write_world(tmp_path, rounds=1)
    ca, cert, key = _write_ca(tmp_path / "certs", "run")
    wrong_ca, _, _ = _write_ca(tmp_path / "other", "other")
    out = tmp_path / "deployed"
    address = f"127.0.0.1:{_free_port()}"
    procs = {}
    try:
        procs["server"] = _start(["server", str(config), "--out", str(out), "--clients", "alice",
                                  "--set", "federated.num_clients=1", "--set", "federated.clients_per_round=1",
                                  "--address", address, "--wait", "90", "--round-timeout", "60",
                                  "--ca", str(ca), "--cert", str(cert), "--key", str(key)], tmp_path / "tls-server.log")
        def device(name: str, trusted: Path) -> None:
            procs[name] = _start(["client", str(config), "--data", str(devices[name]), "--server", address,
                                  "--ca", str(trusted), "--max-wait", "10"], tmp_path / f"tls-{name}.log")

        device("bob", ca)
        device("carol", wrong_ca)
        # The server asks every connected device its id while it waits for alice: bob's
        # refusal is logged before alice exists, so the round cannot race past it.
        refused = "'bob', which is not in the client list"
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while refused not in (tmp_path / "tls-server.log").read_text():
            assert time.monotonic() < deadline and procs["server"].poll() is None, _logs(tmp_path, "tls")
            time.sleep(0.5)
        device("alice", ca)
        assert procs["server"].wait(timeout=PROCESS_TIMEOUT_S) == 0, _logs(tmp_path, "tls")
        carol_code = procs["carol"].wait(timeout=60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert carol_code != 0
    assert "CERTIFICATE_VERIFY_FAILED" in (tmp_path / "tls-carol.log").read_text()
    assert "SSL is enabled" in (tmp_path / "tls-server.log").read_text()
    rows = _rows(out)
    assert len(rows) == 1 and rows[0]["clients"] == 1 and rows[0]["applied"] is True
    assert [r["client_id"] for r in rows[0]["client_reports"]] == ["alice"]
    assert rows[0]["failed_clients"] == []
