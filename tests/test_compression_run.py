"""``federated.compression`` in a run: config errors, bytes, backends, FFA-LoRA, kill + resume with EF state.

The codecs themselves are tested in ``test_fl_codecs.py``; here they run inside
``fedjax-fm run`` on a tiny model. The kill + resume test kills a run whose top-k
codec keeps an error-feedback residual per client after its round-2 checkpoint and
resumes it: the final ``params_sha256`` must equal an uninterrupted run's, which
holds only if every client's residual came back from the checkpoint.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fedjax_fm import fl
from fedjax_fm.config import ConfigError, load_config
from fedjax_fm.training.checkpoint import CheckpointStore
from fedjax_fm.training.experiment import Experiment, run_experiment
from tests.test_experiment_run import REPO, TINY_YAML, _cli, _subprocess_env

TOPK = "federated.compression={name: topk, fraction: 0.05, error_feedback: true}"


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(TINY_YAML.format(default=REPO / "configs" / "default.yaml")
                    .replace("output: {export: true, plots: true}", "output: {export: false, plots: false}"))
    return path


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("spec, key", [
    ("{name: gzip}", "federated.compression.name"),
    ("{name: quantize, bits: 0}", "federated.compression.bits"),
    ("{name: quantize, bits: 33}", "federated.compression.bits"),
    ("{name: topk, fraction: 0}", "federated.compression.fraction"),
    ("{name: topk, fraction: 1.5}", "federated.compression.fraction"),
    ("{name: topk}", "federated.compression.fraction"),
    ("{name: quantize, bitz: 4}", "federated.compression.bitz"),
    ("{name: chain, codecs: [{name: topk, fraction: 0.1}, {name: quantize, bits: 40}]}",
     "federated.compression.codecs[1].bits"),
    ("8", "federated.compression"),
])
def test_bad_codec_config_names_the_key(tiny_config, spec, key):
    with pytest.raises(ConfigError) as error:
        load_config(tiny_config, [f"federated.compression={spec}"])
    assert f"{key}:" in str(error.value)


def test_ffa_lora_without_lora_is_refused(tiny_config, tmp_path):
    cfg = load_config(tiny_config, ["federated.compression={name: ffa_lora}", "lora=null"])
    with pytest.raises(ConfigError, match="federated.compression: codec 'ffa_lora' needs LoRA"):
        run_experiment(cfg, tmp_path / "run")


@pytest.fixture(scope="module")
def topk_run(tiny_config, compile_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "topk"
    summary = run_experiment(load_config(tiny_config, [TOPK]), out)
    return out, summary


def test_bytes_up_is_the_payload_size(tiny_config, topk_run, tmp_path):
    out, _ = topk_run
    cfg = load_config(tiny_config, [TOPK])
    experiment = Experiment(cfg, tmp_path / "probe", stream=None)
    experiment.prepare()
    trainable = experiment.state.params
    codec = fl.make_codec(cfg.federated.compression)
    # A real payload of a real delta: its leaves' bytes are what one client sends.
    delta = jax.tree.map(lambda x: x + 1.0, trainable)
    payload, _ = codec.encode(delta, codec.init(trainable), jax.random.PRNGKey(0))
    per_client = fl.tree_nbytes(payload)
    raw = fl.tree_nbytes(trainable)
    assert per_client < raw / 5  # top-5 % values + int32 indices
    for row in _rows(out)[1:]:
        assert row["bytes_up"] == row["clients"] * per_client
        assert row["bytes_up_raw"] == row["clients"] * raw
        assert row["bytes_down"] == row["clients"] * raw  # the broadcast is not compressed
        assert row["compression_ratio"] == pytest.approx(raw / per_client)
        assert row["codec_seconds"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["bytes_up"] == sum(r["bytes_up"] for r in _rows(out)[1:])


def test_error_feedback_state_is_checkpointed_per_client(tiny_config, topk_run, tmp_path):
    out, _ = topk_run
    experiment = Experiment(load_config(tiny_config, [TOPK]), tmp_path / "probe", stream=None)
    experiment.prepare()
    template = experiment.compression.checkpoint_tree(experiment.state)
    store = CheckpointStore(out / "checkpoints")
    try:
        restored = store.restore_latest(template)
    finally:
        store.close()
    residuals = restored.state.client_codec_states
    per_client = sum(np.sum(np.abs(np.asarray(x)).reshape(np.shape(x)[0], -1), axis=1)
                     for x in jax.tree.leaves(residuals))
    assert per_client.shape == (experiment.data.num_clients,)  # one residual per client of the population
    assert (per_client > 0).any(), "every residual is zero: error feedback kept nothing"


def test_sigkill_and_resume_with_error_feedback_is_bit_identical(tiny_config, topk_run, compile_cache,
                                                                 tmp_path):
    _, reference = topk_run
    out = tmp_path / "killed"
    env = _subprocess_env(compile_cache)
    args = _cli("run", str(tiny_config), "--out", str(out), "--set", TOPK)
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    first_checkpoint = out / "checkpoints" / "2"
    deadline = time.monotonic() + 240
    while not first_checkpoint.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert not (out / "summary.json").exists(), "the run finished before it could be killed"

    resumed = subprocess.run(args + ["--resume"], env=env, capture_output=True, cwd=REPO, timeout=240)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert b"resumed from" in resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["params_sha256"] == reference["params_sha256"]
    assert [r["round"] for r in _rows(out)] == [0, 1, 2, 3, 4]


def test_compression_changes_the_result_and_runs_vmapped(tiny_config, topk_run, compile_cache, tmp_path):
    """The codec is really applied (another fingerprint than without it), and the vmapped
    backend runs it too. (Its parameters are not compared with the sequential run's: the
    backends' deltas differ in the last bits, which can change top-k's choice of entries.)"""
    out, reference = topk_run
    plain = run_experiment(load_config(tiny_config), tmp_path / "plain")
    assert plain["params_sha256"] != reference["params_sha256"]
    vmap = run_experiment(load_config(tiny_config, [TOPK, "federated.backend=vmap"]), tmp_path / "vmap")
    assert len(vmap["params_sha256"]) == 64
    for seq_row, vmap_row in zip(_rows(out)[1:], _rows(tmp_path / "vmap")[1:]):
        assert vmap_row["bytes_up"] == seq_row["bytes_up"] and vmap_row["codec_seconds"] > 0


def test_each_client_encodes_with_its_own_key_and_state(tiny_config, tmp_path):
    """The round's vmapped codec step equals, client by client, one client's encode (with
    :func:`codec_rng` of its training key and its own residual) then the server's decode --
    what a device and the deployment's server do -- and it updates only the sampled rows."""
    from fedjax_fm.training.compression import encode_one

    experiment = Experiment(load_config(tiny_config, [TOPK]), tmp_path / "probe", stream=None)
    experiment.prepare()
    compression, state = experiment.compression, experiment.state
    ids = np.asarray([3, 1])
    # Give client 3 a residual already, as if it had been sampled many rounds ago.
    compression.states = jax.tree.map(lambda x: x.at[3].set(0.01), compression.states)
    before = jax.tree.map(np.array, compression.states)
    deltas = jax.tree.map(lambda x: np.stack([np.full(x.shape, 0.5, x.dtype) * np.arange(x.size).reshape(x.shape),
                                              np.full(x.shape, -0.25, x.dtype)]), state.params)
    outputs = fl.ClientOutputs(deltas, np.ones([2], np.float32), {})
    decoded, _ = compression.apply(outputs, state, ids)
    after = jax.tree.map(np.array, compression.states)
    rngs = fl.client_rngs(state.rng, state.round, ids)
    codec = compression.codec
    for k, client in enumerate(ids):
        one_delta = jax.tree.map(lambda x: x[k], deltas)
        payload, new_state = encode_one(codec, one_delta, jax.tree.map(lambda x: x[client], before), rngs[k])
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[k], decoded.deltas),
                     codec.decode(payload))
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[client], after), new_state)
    for client in (0, 2):  # not sampled: untouched
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x[client], y[client]), before, after)


def test_ffa_lora_run_never_changes_a_and_sends_half(tiny_config, compile_cache, tmp_path):
    cfg = load_config(tiny_config, ["federated.compression={name: ffa_lora}",
                                    "federated.server_optimizer.name=fedadamw",
                                    "federated.server_optimizer.weight_decay=0.1"])
    experiment = Experiment(cfg, tmp_path / "ffa", stream=None)
    experiment.prepare()
    before = jax.device_get(experiment.state.params)
    experiment = Experiment(cfg, tmp_path / "ffa", stream=None)
    experiment.run()
    after = jax.device_get(experiment.state.params)
    mask = fl.lora_a_mask(before)
    moved_b = False
    for is_a, x0, x1 in zip(jax.tree.leaves(mask), jax.tree.leaves(before), jax.tree.leaves(after)):
        if is_a:
            np.testing.assert_array_equal(x0, x1)
        else:
            moved_b = moved_b or not np.array_equal(x0, x1)
    assert moved_b, "B never moved: the test would be vacuous"
    rows = _rows(tmp_path / "ffa")
    a_bytes = sum(x.nbytes for is_a, x in zip(jax.tree.leaves(mask), jax.tree.leaves(before)) if is_a)
    raw = fl.tree_nbytes(before)
    assert rows[1]["bytes_up"] == rows[1]["clients"] * (raw - a_bytes)
