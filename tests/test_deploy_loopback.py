"""Loopback Flower deployment: a SuperLink and SuperNodes on 127.0.0.1, TLS and node authentication on.

Every test runs the documented commands (docs/deploy.md): ``flower-superlink
--enable-supernode-auth`` with TLS, ``fedjax-fm deploy keygen`` for each device's key,
``flwr supernode register`` of the listed devices' public keys, ``flower-supernode
--auth-supernode-private-key ... --node-config ...`` per device and ``fedjax-fm deploy
run --device-keys keys/`` on the server side (each listed id bound to its device's key).

* node authentication: a SuperNode whose key is not registered, and one without a
  key, are refused by the SuperLink; a registered one trusting another CA fails the
  TLS handshake; the registered device trains and the run completes;
* equivalence: the deployed run's global parameters equal the simulation's, across a
  resumed second run, while a registered impostor device claiming alice's id (with
  other data) is given no work and reported in every round;
* ``deploy run`` refuses a listed id whose key is not registered, before submitting;
* a device killed mid-round and one returning NaN: the round completes with the
  remaining device and both are reported;
* secure aggregation (SecAgg+): within the quantisation bound of the plain run and of
  simulated DP-FedAvg, also when a device is killed between key sharing and masking.

Every process is started in its own session with a timeout and its whole process
group is killed in ``finally``; ports are chosen at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

REPO = Path(__file__).resolve().parents[1]

CLIENTS = ("alice", "bob", "carol")
SIZES = {"alice": 5, "bob": 7, "carol": 6, "dave": 4}  # dave: the fault test's fourth device
RUN_TIMEOUT_S = 600  # one `fedjax-fm deploy run`, start to end (a ceiling, see below)
# Ceilings (not targets) for starting processes and CLI helpers: a passing test never
# waits for them, and on a loaded 2-core VM four `deploy keygen` at once took past 60 s.
STARTUP_TIMEOUT_S = 300
DRILL_APP = Path(__file__).resolve().parent / "drill_app"  # fault drills: a test-only ClientApp

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
  packing: {{enabled: true, input_length: 96, target_length: 32}}  # devices pack their own data
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


def _write_world(tmp: Path, rounds: int, clients: tuple[str, ...] = CLIENTS) -> tuple[Path, dict[str, Path]]:
    """The config, the pooled client folder (simulation) and one folder per device."""
    from fedjax_fm.data.local_files import write_jsonl

    pooled = tmp / "clients"
    devices = {}
    for client in clients:
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
    bin_dir = str(Path(sys.executable).parent)  # flower-superlink, flwr, flower-superexec, flwr-clientapp
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PATH=bin_dir + os.pathsep + env.get("PATH", ""),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               # Flower's SuperExec polls for work every second by default; poll faster here.
               FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2", **extra)
    return env


def _tail(path: Path, n: int = 4000) -> str:
    return f"--- {path.name}\n{path.read_text(errors='replace')[-n:]}" if path.exists() else f"--- {path.name}: none"


class Federation:
    """A SuperLink with TLS and SuperNode authentication, plus SuperNodes, all on 127.0.0.1.

    The Flower CLI reads the connection ``fedjax`` from ``FLWR_HOME/config.toml``
    (as docs/deploy.md sets it up on the server)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        self.node_ids: dict[str, int] = {}
        self.ca, cert, key = _write_ca(tmp / "certs", "run")
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        self.xla_cache = tmp / "xla-cache"  # shared by the server and the devices: one compile per shape
        self.address = f"127.0.0.1:{_free_port()}"
        # What docs/deploy.md appends to ~/.flwr/config.toml.
        (self.home / "config.toml").write_text(
            f'\n[superlink.fedjax]\naddress = "{self.address}"\nroot-certificates = "{self.ca}"\n')
        self.link_log = tmp / "superlink.log"
        try:
            self._start("superlink", ["flower-superlink", "--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(cert),
                                      "--ssl-keyfile", str(key), "--enable-supernode-auth", "--host", "127.0.0.1",
                                      "--port", self.address.rsplit(":", 1)[1], "--database",
                                      str(tmp / "superlink.db"), "--disable-runtime-dependency-installation"],
                        self.link_log, FLWR_HOME=str(self.home))
            self.wait_for(self.link_log, "Uvicorn running on", STARTUP_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, command: list[str], log: Path, **env: str) -> subprocess.Popen:
        env.setdefault("JAX_COMPILATION_CACHE_DIR", str(self.xla_cache))
        proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=_env(**env),
                                cwd=self.tmp, start_new_session=True)
        self.procs[name] = proc
        return proc

    def wait_for(self, log: Path, text: str, timeout_s: float, proc: str = "superlink") -> None:
        deadline = time.monotonic() + timeout_s
        while text not in (log.read_text(errors="replace") if log.exists() else ""):
            if time.monotonic() > deadline or self.procs[proc].poll() is not None:
                pytest.fail(f"{text!r} not in {log.name} after {timeout_s} s\n{self.logs()}")
            time.sleep(0.2)

    def keys(self, names: list[str], *, register: bool = True) -> dict[str, Path]:
        """``fedjax-fm deploy keygen keys/NAME`` for each device, then (server side)
        ``flwr supernode register keys/NAME.pub fedjax``; each step in parallel."""
        keys = {name: self.tmp / "keys" / name for name in names}
        self._all([[sys.executable, "-m", "fedjax_fm", "deploy", "keygen", str(key)] for key in keys.values()])
        if register:
            done = self._all([["flwr", "supernode", "register", f"{key}.pub", "fedjax", "--format", "json"]
                              for key in keys.values()])
            self.node_ids.update({name: int(json.loads(out)["node-id"]) for name, out in zip(names, done)})
        return keys

    def _all(self, commands: list[list[str]], timeout_s: float = STARTUP_TIMEOUT_S) -> list[str]:
        env = _env(FLWR_HOME=str(self.home))
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  cwd=self.tmp) for c in commands]
        outputs = []
        try:
            for command, proc in zip(commands, procs):
                out, err = proc.communicate(timeout=timeout_s)
                assert proc.returncode == 0, f"{command}: {out}{err}"
                outputs.append(out)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
        return outputs

    def nodes(self) -> dict[int, str]:
        """``flwr supernode ls fedjax``: node id -> status."""
        done = subprocess.run(["flwr", "supernode", "ls", "fedjax", "--format", "json"], capture_output=True,
                              text=True, env=_env(FLWR_HOME=str(self.home)), cwd=self.tmp, timeout=STARTUP_TIMEOUT_S)
        assert done.returncode == 0, done.stdout + done.stderr
        return {int(n["node-id"]): n["status"] for n in json.loads(done.stdout)["nodes"]}

    def start_node(self, name: str, data: Path | None, config: Path, *, key: Path | None, ca: Path | None = None,
                   extra: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
        """``flower-supernode`` for one device (its own Flower home and Runtime API port)."""
        command = ["flower-supernode", "--superlink", self.address, "--root-certificates", str(ca or self.ca),
                   "--port", str(_free_port()), "--node-config", f'config="{config}" data="{data}"', *extra]
        if key is not None:
            command += ["--auth-supernode-private-key", str(key)]
        home = self.tmp / f"home-{name}"
        home.mkdir(exist_ok=True)
        return self._start(name, command, self.tmp / f"node-{name}.log", FLWR_HOME=str(home), **env)

    def run(self, config: Path, out: Path, clients: str, *extra: str, tag: str = "run",
            timeout_s: float = RUN_TIMEOUT_S) -> tuple[int, str]:
        """``fedjax-fm deploy run --device-keys keys/`` to the end; returns its exit code and output."""
        log = self.tmp / f"{tag}.log"
        command = [sys.executable, "-m", "fedjax_fm", "deploy", "run", str(config), "--out", str(out),
                   "--clients", clients, "--superlink", "fedjax", "--device-keys", str(self.tmp / "keys"),
                   "--wait", "90", *extra]
        proc = self._start(tag, command, log, FLWR_HOME=str(self.home))
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`fedjax-fm deploy run` did not finish in {timeout_s} s\n{self.logs()}")
        return code, log.read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(_tail(p) for p in sorted(self.tmp.glob("*.log")))

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the SuperNode/SuperLink and their children
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _simulate(config: Path, rounds: int):
    """The simulation's server state after ``rounds`` rounds (the same pieces as ``fedjax-fm run``)."""
    from fedjax_fm import fl
    from fedjax_fm.training import builders as setup
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
    from fedjax_fm.training import builders as setup
    from fedjax_fm.config import load_config
    from fedjax_fm.training.fingerprint import named_leaves

    cfg = load_config(config, ["lora=null"])
    _, variables = setup.build_model(cfg, None)
    return [{"name": n, "shape": list(np.shape(x))} for n, x in named_leaves(variables["params"])]


def _restore(out: Path, template):
    from fedjax_fm.training.checkpoint import CheckpointStore

    store = CheckpointStore(out / "checkpoints")
    try:
        return store.restore_latest(template)
    finally:
        store.close()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


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


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink (TLS, node authentication) with alice, bob and carol registered and connected,
    plus mallet: registered and connected too, but its data file says it is alice (other data)."""
    from fedjax_fm.data.local_files import write_jsonl

    tmp = tmp_path_factory.mktemp("federation")
    config, devices = _write_world(tmp, rounds=2)
    impostor = tmp / "devices" / "mallet"
    write_jsonl(impostor / "alice.jsonl", _examples("mallet", SIZES["alice"]))
    with Federation(tmp) as fed:
        _start_devices(fed, config, {**devices, "mallet": impostor})
        for client in (*CLIENTS, "mallet"):
            fed.wait_for(tmp / f"node-{client}.log", "SuperNode ID", STARTUP_TIMEOUT_S, proc=client)
        yield fed, config, devices


def _start_devices(fed: Federation, config: Path, devices: dict[str, Path], env: dict | None = None) -> None:
    keys = fed.keys(list(devices))
    for client, folder in devices.items():
        fed.start_node(client, folder, config, key=keys[client], **(env or {}).get(client, {}))


def test_supernodes_without_a_registered_key_are_refused(federation):
    """On the SuperLink where alice, bob and carol are registered (and which the equivalence
    test below runs on): mallory's key is not registered, nokey has no key, and dan (key
    registered) trusts another CA -- all three are refused and never become nodes."""
    fed, config, devices = federation
    tmp = fed.tmp
    keys = fed.keys(["mallory"], register=False) | fed.keys(["dan"])
    wrong_ca, _, _ = _write_ca(tmp / "other", "other")
    refused = {
        "mallory": fed.start_node("mallory", devices["alice"], config, key=keys["mallory"]),
        "nokey": fed.start_node("nokey", devices["alice"], config, key=None),
        "dan": fed.start_node("dan", devices["alice"], config, key=keys["dan"], ca=wrong_ca,
                              extra=("--max-wait-time", "5")),
    }
    codes = {name: proc.wait(timeout=90) for name, proc in refused.items()}
    link = fed.link_log.read_text(errors="replace")
    logs = {name: (tmp / f"node-{name}.log").read_text(errors="replace") for name in refused}
    assert all(code not in (0, None) for code in codes.values()), codes
    # mallory: the SuperLink knows no SuperNode with her public key.
    assert "Failed to activate SuperNode" in logs["mallory"], logs["mallory"]
    assert "No SuperNode found with the given public key" in link
    # nokey: without a key a SuperNode tries to register itself, which node authentication forbids.
    assert "SuperNode authentication is enabled. All SuperNodes must be registered" in logs["nokey"], logs["nokey"]
    assert "[/v1/fleet/register-node][ApiError:2001]" in link
    # dan: TLS refuses a server certificate from another CA, before any authentication.
    assert "CERTIFICATE_VERIFY_FAILED" in logs["dan"], logs["dan"]
    assert not any("SuperNode ID" in log for log in logs.values())
    # The registered devices are online; dan's registered key never connected; nobody else is a node.
    nodes = fed.nodes()
    assert {nodes[fed.node_ids[c]] for c in (*CLIENTS, "mallet")} == {"online"}, nodes
    assert nodes[fed.node_ids["dan"]] == "registered"
    assert set(nodes) == set(fed.node_ids.values())
    # `deploy run --device-keys` refuses a listed id whose key (keys/mallory.pub) is not registered, and
    # names the command that would register it -- before submitting anything.
    code, out = fed.run(config, tmp / "never", "alice,bob,mallory", tag="unregistered")
    assert code == 2, out
    assert "public key(s) of mallory are not registered with SuperLink 'fedjax'" in out
    assert f"flwr supernode register {tmp / 'keys' / 'mallory.pub'} fedjax" in out
    assert not (tmp / "never").exists() and "Successfully started run" not in out


def test_loopback_equals_simulation_and_resumes(federation):
    """Registered devices join: run 1 (one round) stops; run 2 (--resume) does round 2,
    equal to 2 simulated rounds. mallet (registered, online, claims alice's id with other
    data) gets no work in either run and is reported in every row: alice's id is bound to
    alice's key."""
    fed, config, devices = federation
    out = fed.tmp / "deployed"
    code, _ = fed.run(config, out, ",".join(CLIENTS), "--set", "federated.rounds=1", tag="first")
    assert code == 0, fed.logs()
    code, second = fed.run(config, out, ",".join(CLIENTS), "--resume", tag="second")
    assert code == 0, fed.logs()
    assert "resumed from" in second
    mallet = fed.node_ids["mallet"]
    for log in (fed.tmp / "first.log", fed.tmp / "second.log"):
        text = log.read_text(errors="replace")
        assert f"alice: node {fed.node_ids['alice']}" in text  # the binding deploy run resolved
        assert f"REJECTED device node {mallet}: it claims 'alice', but 'alice' is bound to node " \
               f"{fed.node_ids['alice']}" in text, text[-4000:]

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
        # Each id's work went to its own key's node, and the impostor is on record.
        assert {r["client_id"]: int(r["node_id"]) for r in row["client_reports"]} == \
            {c: fed.node_ids[c] for c in CLIENTS}
        assert [(d["node_id"], d["claimed"]) for d in row["rejected_devices"]] == [(str(mallet), "alice")]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and len(summary["params_sha256"]) == 64
    assert summary["client_nodes"] == {c: str(fed.node_ids[c]) for c in CLIENTS}
    assert summary["rejected_devices"] == [{"node_id": str(mallet), "claimed": "alice"}]


@pytest.mark.drill  # minutes long: not in the README's test command (pyproject.toml)
def test_device_killed_hung_and_nan_update_do_not_break_the_round(tmp_path):
    """Round 2: carol's device (SuperNode and all) is SIGKILLed mid-training, dave's hangs
    (alive, never answers: ``--round-timeout`` gives up on it), bob sends NaN; alice's
    update is applied; all three reported.

    Run with full fine-tuning (``lora=null``): the whole ``params`` collection travels."""
    clients = (*CLIENTS, "dave")
    config, devices = _write_world(tmp_path, rounds=2, clients=clients)
    out = tmp_path / "deployed"
    env = {"carol": {"FEDJAX_FM_DRILL_CRASH_AT_ROUND": "2"}, "bob": {"FEDJAX_FM_DRILL_NAN_AT_ROUND": "2"},
           "dave": {"FEDJAX_FM_DRILL_HANG_AT_ROUND": "2"}}
    settings = ("--set", "lora=null", "--set", "federated.num_clients=4", "--set", "federated.clients_per_round=4",
                "--app", str(DRILL_APP))
    with Federation(tmp_path) as fed:
        _start_devices(fed, config, devices, env)
        # A warm-up run of one fault-free round fills the shared compilation cache and
        # measures how long a round takes on this machine *now* (four devices compiling at
        # once on a loaded 2-core VM took past a fixed 60 s: issue 17). The drill's
        # --round-timeout, which the hung device makes the round wait out, derives from it.
        code, _ = fed.run(config, tmp_path / "warm-up", ",".join(clients), *settings, "--set", "federated.rounds=1",
                          "--round-timeout", str(RUN_TIMEOUT_S), tag="warm-up")
        assert code == 0, fed.logs()
        warm_round_s = _rows(tmp_path / "warm-up")[0]["wall_seconds"]
        # Round 1 of the drill reads the cache the warm-up filled, so twice a cold round is ample.
        round_timeout = max(20, int(2 * warm_round_s) + 1)
        # Its run's ceiling follows: two rounds, the second waiting out the hung device.
        code, _ = fed.run(config, out, ",".join(clients), *settings, "--round-timeout", str(round_timeout), tag="faults",
                          timeout_s=RUN_TIMEOUT_S + 2 * round_timeout)
        assert code == 0, f"--round-timeout {round_timeout} (warm-up round {warm_round_s:.1f} s)\n" + fed.logs()
        carol = fed.procs["carol"].wait(timeout=30)
        assert fed.procs["dave"].poll() is None  # the hung device is still alive: only the round gave up on it
        dave_log = (tmp_path / "node-dave.log").read_text(errors="replace")
    assert carol == -signal.SIGKILL  # the device really died
    assert "fault drill, hanging in round 2" in dave_log
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["valid_clients"] == 4 and rows[0]["failed_clients"] == []
    full_bytes = 4 * sum(int(np.prod(r["shape"])) for r in _param_shapes(config))
    assert rows[0]["bytes_up"] == 4 * full_bytes < rows[0]["bytes_up_sent"]
    second = rows[1]
    failed = {f["client"]: f["reason"] for f in second["failed_clients"]}
    assert sorted(failed) == ["carol", "dave"], failed
    # Flower gave up on the hung device: its message expired at --round-timeout (TTL), or, when the
    # derived timeout is longer than Flower's heartbeat expiry, the node was declared unavailable.
    assert "TTL" in failed["dave"] or "failed to report a heartbeat" in failed["dave"], failed["dave"]
    assert second["nonfinite_clients"] == ["bob"]
    assert second["clients"] == 2 and second["valid_clients"] == 1 and second["applied"] is True
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


CODEC = "federated.compression={name: topk, fraction: 0.1, error_feedback: true}"


def _simulate_with_codec(config: Path, rounds: int, overrides: list[str]):
    """The simulation's server state after ``rounds`` rounds with ``fedjax-fm run``'s codec step."""
    from fedjax_fm import fl
    from fedjax_fm.config import load_config
    from fedjax_fm.training import builders as setup
    from fedjax_fm.training.compression import RunCompression

    cfg = load_config(config, overrides)
    tokenizer = setup.build_tokenizer(cfg, config.parent, lambda: [])
    data = setup.build_data(cfg, tokenizer)
    model, variables = setup.build_model(cfg, tokenizer)
    trainable, frozen = fl.split_variables(variables, fl.trainable_collections(True))
    algorithm = setup.build_algorithm(cfg, model)
    state = algorithm.init(trainable, cfg.seed)
    compression = RunCompression(cfg.federated.compression, trainable, data.num_clients)
    for r in range(rounds):
        ids = fl.sample_clients(cfg.seed, r, data.num_clients, cfg.federated.clients_per_round)
        outputs = algorithm.run_clients(state, frozen, data.clients_round_batches([int(i) for i in ids], r), ids)
        outputs, _ = compression.apply(outputs, state, ids)
        state, _ = algorithm.server_step(state, outputs)
    return state, compression, trainable


def _residual_report(compression, devices: dict[str, Path]) -> str:
    """Per device: in how many coordinates its saved residual after round 2 differs from the
    simulation's (0 everywhere points at the server's side; a few at a top-k near-tie)."""
    from fedjax_fm.training.fingerprint import named_leaves

    lines = []
    for position, client in enumerate(CLIENTS):
        simulated = dict(named_leaves(jax.device_get(jax.tree.map(lambda x: x[position], compression.states))))
        with np.load(devices[client] / "codec_state" / client / "1.npz") as saved:
            differ = sum(int(np.sum(saved[name] != np.asarray(value))) for name, value in simulated.items())
        total = sum(np.size(value) for value in simulated.values())
        lines.append(f"{client}: residual after round 2 differs from the simulation's in {differ} of {total} coordinates")
    return "\n".join(lines)


def test_loopback_with_a_codec_equals_simulation(federation):
    """Devices send top-k 10 % payloads with error feedback (each keeps its residual on disk
    between rounds), the server decodes them: two rounds equal the simulation with the same
    codec, and the bytes on the wire are the payload's (plus only the wire format's headers)."""
    from flwr.common import ndarray_to_bytes

    from fedjax_fm import fl
    from fedjax_fm.deploy.wire import encode_tree, payload_bytes

    fed, config, devices = federation
    out = fed.tmp / "deployed-codec"
    code, _ = fed.run(config, out, ",".join(CLIENTS), "--set", CODEC, tag="codec")
    assert code == 0, fed.logs()
    expected, compression, trainable = _simulate_with_codec(config, 2, [CODEC])
    restored = _restore(out, expected)
    assert restored.round == 2
    rows = _rows(out)
    assert [sorted(r["client_id"] for r in row["client_reports"]) for row in rows] == [list(CLIENTS)] * 2, rows
    got, want = jax.device_get(restored.state.params), jax.device_get(expected.params)
    try:
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6), got, want)
    except AssertionError as error:  # say where the two runs parted (top-k decides on exact values)
        raise AssertionError(f"{error}\n{_residual_report(compression, devices)}\n{fed.logs()[-6000:]}") from None
    plain = _simulate(config, rounds=2)
    assert not jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b, rtol=1e-3), want,
                                         jax.device_get(plain.params))), "the codec changed nothing"
    # Every device kept its own residual, one file per round it trained.
    for client in CLIENTS:
        assert sorted(p.name for p in (devices[client] / "codec_state" / client).glob("*.npz")) == ["0.npz", "1.npz"]

    codec = compression.codec
    payload, _ = codec.encode(trainable, codec.init(trainable), jax.random.PRNGKey(0))
    wire_each = payload_bytes(encode_tree(payload))  # sizes depend on shapes only
    raw = fl.tree_nbytes(trainable)
    for row in rows:
        assert row["bytes_up"] == 3 * fl.tree_nbytes(payload) == 3 * compression.bytes_up
        assert row["bytes_up_sent"] == 3 * wire_each < row["bytes_up_raw"] == 3 * raw
        header = wire_each - sum(len(ndarray_to_bytes(np.asarray(x))) for x in jax.tree.leaves(payload))
        assert 0 < wire_each - compression.bytes_up < 160 * len(jax.tree.leaves(payload)) + header
        assert row["compression_ratio"] == pytest.approx(raw / compression.bytes_up)
        assert row["codec_seconds"] > 0
        assert all(r["encode_seconds"] > 0 and r["decode_seconds"] > 0 for r in row["client_reports"])


# -- secure aggregation (SecAgg+) -----------------------------------------------------------
#
# Devices clip every value to ±c and round it stochastically to one of Q levels, so each
# device's error is below one level 2c/Q per coordinate; the server's mean over n devices
# with uniform weights errs by less than n·(2c/Q)/n = 2c/Q (fedjax_fm/deploy/secure.py), and
# with FedAvg at learning rate 1 the parameters move by exactly the mean: the deployed
# parameters are within 2c/Q of the plain run's (= the simulation's, tested above), plus the
# float tolerance of that comparison. Q is coarse here (2^16) so that the quantisation shows.
SECAGG_C, SECAGG_Q = 1.0, 2**16
SECAGG = (f"deploy.secure_aggregation={{enabled: true, clipping_range: {SECAGG_C}, "
          f"quantization_range: {SECAGG_Q}}}")
SECAGG_SETTINGS = ("--set", SECAGG, "--set", "federated.weighting=uniform",
                   "--set", "federated.server_optimizer={name: fedavg, learning_rate: 1.0}", "--app", str(DRILL_APP))
DP = "federated.dp={noise_multiplier: 0.5, clip_norm: 0.05, sampling: fixed}"
FLOAT_TOL = dict(rtol=2e-5, atol=1e-6)  # the plain loopback run's tolerance against simulation


def _simulation(config: Path, overrides: list[str]):
    """The simulation's pieces for ``config`` with ``overrides`` (DP-FedAvg when configured)."""
    from fedjax_fm import fl
    from fedjax_fm.config import load_config
    from fedjax_fm.training import builders as setup
    from fedjax_fm.training.privacy import RunPrivacy

    cfg = load_config(config, overrides)
    tokenizer = setup.build_tokenizer(cfg, config.parent, lambda: [])
    data = setup.build_data(cfg, tokenizer)
    model, variables = setup.build_model(cfg, tokenizer)
    trainable, frozen = fl.split_variables(variables, fl.trainable_collections(True))
    algorithm = setup.build_algorithm(cfg, model)
    privacy = RunPrivacy.from_config(cfg, data.num_clients)
    if privacy is not None:
        algorithm = privacy.algorithm(algorithm)
    return cfg, data, frozen, algorithm, algorithm.init(trainable, cfg.seed), privacy


def _simulated_round(sim, state, round_index: int, ids: list[int]):
    _, data, frozen, algorithm, _, _ = sim
    new, _ = algorithm.round(state, frozen, data.clients_round_batches(ids, round_index), np.asarray(ids))
    return new


def _within(got, want, bound: float) -> float:
    """Asserts |got - want| <= bound + the float tolerance everywhere; returns the largest error."""
    largest = 0.0
    for g, w in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))):
        error = np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64))
        assert np.all(error <= bound + FLOAT_TOL["atol"] + FLOAT_TOL["rtol"] * np.abs(w)), (error.max(), bound)
        largest = max(largest, float(error.max()))
    return largest


@pytest.mark.drill  # minutes long: not in the README's test command (pyproject.toml)
def test_secure_aggregation_matches_the_plain_run_within_the_bound_with_dp_and_a_dropout(tmp_path):
    """Two SecAgg+ runs on one federation of alice, bob and carol (drill app: carol's device
    is SIGKILLed in the training of round 2 of a run, i.e. between SecAgg+'s key sharing and
    its masked-vector collection, so its masks must be reconstructed from its neighbours' shares):

    * DP run (1 round): devices clip to C inside SecAgg+, the server noises the unmasked sum
      with the simulation's key: the parameters equal simulated DP-FedAvg within n·(2c/Q)/K;
      ε is reported as in simulation;
    * plain run (2 rounds, uniform weights, FedAvg): round 1 is within 2c/Q of the plain
      (= simulated) round; in round 2 carol drops out, the round is aggregated from alice and
      bob, and is within 2c/Q of a plain round of alice and bob from the same parameters."""
    from fedjax_fm.training.checkpoint import CheckpointStore

    config, devices = _write_world(tmp_path, rounds=2)
    level = 2 * SECAGG_C / SECAGG_Q
    with Federation(tmp_path) as fed:
        _start_devices(fed, config, devices, {"carol": {"FEDJAX_FM_DRILL_CRASH_AT_ROUND": "2"}})
        dp_out = tmp_path / "secure-dp"
        code, _ = fed.run(config, dp_out, ",".join(CLIENTS), *SECAGG_SETTINGS, "--set", DP, "--set",
                          "federated.rounds=1", tag="secure-dp")
        assert code == 0, fed.logs()
        out = tmp_path / "secure"
        code, _ = fed.run(config, out, ",".join(CLIENTS), *SECAGG_SETTINGS, tag="secure")
        assert code == 0, fed.logs()
        carol = fed.procs["carol"].wait(timeout=120)
    assert carol == -signal.SIGKILL  # the device really died, inside SecAgg+'s round 2

    # DP with SecAgg+: the simulation's DP-FedAvg round, within the quantisation bound of the noised mean.
    dp_sim = _simulation(config, [SECAGG, "federated.weighting=uniform",
                                  "federated.server_optimizer={name: fedavg, learning_rate: 1.0}", DP])
    want = _simulated_round(dp_sim, dp_sim[4], 0, [0, 1, 2])
    got = _restore(dp_out, want)
    assert got.round == 1
    (row,) = _rows(dp_out)
    assert row["secure_aggregation"] is True and row["valid_clients"] == 3 and row["secagg_clipped_values"] == 0
    assert row["secagg_error_bound"] == pytest.approx(3 * level / 3)  # n·(2c/Q)/K
    assert _within(got.state.params, want.params, row["secagg_error_bound"]) > 0
    privacy = dp_sim[5]
    privacy.restore(1)
    assert row["dp_epsilon"] == pytest.approx(privacy.ledger.epsilon()) and row["dp_epsilon"] > 0
    assert row["dp_clip_norm"] == pytest.approx(0.05)
    # Every device's update was clipped (norm about 1 here, C = 0.05): without, the comparison would fail.
    summary = json.loads((dp_out / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(row["dp_epsilon"])
    assert "central DP" in summary["privacy"]["model"]

    # Plain SecAgg+, round 1: all three devices.
    sim = _simulation(config, [SECAGG, "federated.weighting=uniform",
                               "federated.server_optimizer={name: fedavg, learning_rate: 1.0}"])
    first = _simulated_round(sim, sim[4], 0, [0, 1, 2])
    store = CheckpointStore(out / "checkpoints")
    try:
        deployed_1 = store.restore(1, first)
        deployed_2 = store.restore(2, first)
    finally:
        store.close()
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["valid_clients"] == 3 and rows[0]["failed_clients"] == [] and rows[0]["applied"] is True
    assert rows[0]["secagg_error_bound"] == pytest.approx(level)  # n·(2c/Q)/n_valid with n = n_valid = 3
    largest = _within(deployed_1.state.params, first.params, level)
    assert largest > 10 * FLOAT_TOL["atol"], "no quantisation error at all: was the update really quantised?"
    assert not jax.tree.all(jax.tree.map(lambda a, b: np.allclose(a, b), jax.device_get(first.params),
                                         jax.device_get(sim[4].params))), "training moved nothing"
    # Round 2: carol died after sharing her keys; SecAgg+ unmasked the sum of alice and bob.
    second = rows[1]
    assert [f["client"] for f in second["failed_clients"]] == ["carol"], second["failed_clients"]
    assert second["clients"] == 2 and second["valid_clients"] == 2 and second["applied"] is True
    assert second["secagg_error_bound"] == pytest.approx(level)
    want_2 = _simulated_round(sim, deployed_1.state, 1, [0, 1])
    _within(deployed_2.state.params, want_2.params, level)
    for row in rows:
        assert row["secure_aggregation"] is True and row["secagg_clipped_values"] == 0
        assert row["nonfinite_clients"] == [] and row["dp_epsilon"] is None
        # What travelled up: the masked vectors (integers mod 2^32), as the devices measured them.
        assert row["bytes_up_sent"] > row["bytes_up"] > 0
        assert all(r["secagg_weight"] == 1 for r in row["client_reports"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"]["quantization_level"] == pytest.approx(level)
    assert summary["secure_aggregation"]["clipped_values"] == 0 and summary["privacy"] is None
