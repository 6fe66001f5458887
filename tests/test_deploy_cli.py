"""``fedjax-fm deploy keygen|run`` and the Flower App's checks, without a SuperLink."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "fedjax_fm", "deploy", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_keygen_writes_a_key_pair_flower_accepts_and_never_overwrites(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    key = tmp_path / "keys" / "jetson-a"
    done = _cli("keygen", str(key), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # What flower-supernode --auth-supernode-private-key and `flwr supernode register` load.
    private = load_ssh_private_key(key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert try_load_public_key(Path(f"{key}.pub")).startswith(b"-----BEGIN PUBLIC KEY-----")
    before = key.read_bytes()
    again = _cli("keygen", str(key), cwd=tmp_path)
    assert again.returncode == 2 and "already exist" in again.stderr
    assert key.read_bytes() == before


CONFIG = """\
seed: 0
model: {name: tiny, init: random, tokenizer: byt5, vocab_size: 512, dtype: float32}
data: {source: {kind: client_folder, path: data}}
federated: {rounds: 1, num_clients: 2, clients_per_round: 2, local_steps: 1, local_epochs: null, batch_size: 2}
"""


def test_run_refuses_bad_requests_before_contacting_a_superlink(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    common = ("--superlink", "nowhere", "--no-device-keys")
    few = _cli("run", str(config), "--out", "out", "--clients", "a", *common, cwd=tmp_path)
    assert few.returncode == 2 and "clients_per_round=2 but --clients lists 1" in few.stderr
    dup = _cli("run", str(config), "--out", "out", "--clients", "a,a", *common, cwd=tmp_path)
    assert dup.returncode == 2 and "distinct" in dup.stderr
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("")
    held = _cli("run", str(config), "--out", "out", "--clients", "a,b", *common, cwd=tmp_path)
    assert held.returncode == 2 and "already holds a run; pass --resume" in held.stderr
    epochs = _cli("run", str(config), "--out", "fresh", "--clients", "a,b", "--set", "federated.local_epochs=1",
                  *common, cwd=tmp_path)
    assert epochs.returncode == 2 and "federated.local_steps" in epochs.stderr
    # Binding is a choice the operator makes explicitly.
    unchosen = _cli("run", str(config), "--out", "fresh", "--clients", "a,b", "--superlink", "nowhere", cwd=tmp_path)
    assert unchosen.returncode == 2 and "one of the arguments --device-keys --no-device-keys is required" \
        in unchosen.stderr
    # A listed client without a key file is named before any SuperLink is contacted ("nowhere" is no connection).
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "a.pub").write_text("ecdsa-sha2-nistp384 AAAA a\n")
    nokey = _cli("run", str(config), "--out", "fresh", "--clients", "a,b", "--superlink", "nowhere",
                 "--device-keys", "keys", cwd=tmp_path)
    assert nokey.returncode == 2 and "no public key for listed client(s) b (expected keys/b.pub)" in nokey.stderr


def test_client_app_names_a_missing_node_config(tmp_path):
    from flwr.app import Context, RecordDict

    from fedjax_fm.deploy.apps import DeployAppError, _client_fn

    context = Context(run_id=1, node_id=2, node_config={"data": str(tmp_path)}, state=RecordDict(), run_config={})
    with pytest.raises(DeployAppError, match=r"without \['config'\].*--node-config 'config="):
        _client_fn(context)
    (tmp_path / "jetson-a.jsonl").write_text('{"dialogue": "a", "summary": "b"}\n')
    context.node_config["config"] = "experiment.yaml"
    client = _client_fn(context)
    from flwr.common import GetPropertiesIns

    assert client.get_properties(GetPropertiesIns({})).properties == {"client_id": "jetson-a"}
