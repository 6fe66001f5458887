"""Orbax checkpoint store: exact round trip, keep-last-n, corrupt and incompatible checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm.training.checkpoint import CheckpointError, CheckpointStore
from fedjax_fm.training.fingerprint import named_leaves, params_sha256


def _state(scale: float = 1.0):
    params = {"params": {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3) * scale}, "scale": jnp.ones(3, jnp.bfloat16)}}
    return {
        "params": params,
        "opt_state": optax.adam(1e-3).init(params),
        "round": jnp.asarray(3, jnp.int32),
        "rng": jax.random.PRNGKey(7),
    }


def test_round_trip_is_bit_exact_with_metrics(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", every=1, keep=3)
    state = _state(1.2345678)
    rows = [{"round": 1, "rougeL": 12.5, "client_joules": None}]
    assert store.save(1, state, rows)
    restored = store.restore_latest(_state(0.0))
    assert restored.round == 1 and restored.metrics == rows
    assert params_sha256(restored.state) == params_sha256(state)
    assert jax.tree.structure(restored.state) == jax.tree.structure(state)
    assert restored.state["params"]["params"]["scale"].dtype == jnp.bfloat16


def test_typed_prng_keys_survive(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    state = {"key": jax.random.key(3), "x": jnp.zeros(2)}
    store.save(1, state, [])
    restored = store.restore_latest({"key": jax.random.key(0), "x": jnp.ones(2)})
    np.testing.assert_array_equal(jax.random.key_data(restored.state["key"]), jax.random.key_data(state["key"]))


def test_interval_and_keep_last_n(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", every=2, keep=2)
    saved = [r for r in range(1, 8) if store.save(r, _state(r), [])]
    assert saved == [2, 4, 6]
    assert store.save(7, _state(7), [], force=True)  # the last round is always saved
    assert store.all_rounds() == [6, 7]


def test_corrupt_newest_falls_back_to_previous(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", every=1, keep=3)
    store.save(1, _state(1.0), [{"round": 1}])
    store.save(2, _state(2.0), [{"round": 2}])
    for path in (tmp_path / "ckpt" / "2" / "arrays").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a checkpoint")
    skipped = []
    restored = CheckpointStore(tmp_path / "ckpt").restore_latest(_state(0.0), on_skip=skipped.append)
    assert restored.round == 1
    assert params_sha256(restored.state) == params_sha256(_state(1.0))
    assert len(skipped) == 1 and "ckpt/2" in str(skipped[0]) and "unreadable" in str(skipped[0])


def test_incompatible_checkpoint_names_itself_and_the_leaf(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    store.save(1, _state(), [])
    other = _state()
    other["params"]["params"]["dense"]["kernel"] = jnp.zeros((4, 3))
    with pytest.raises(CheckpointError) as error:
        store.restore(1, other)
    assert "ckpt/1" in str(error.value) and "params/params/dense/kernel" in str(error.value)
    with pytest.raises(CheckpointError, match="no checkpoint under .* could be restored"):
        store.restore_latest({"just": jnp.zeros(1)})


def test_no_checkpoint_gives_none(tmp_path):
    assert CheckpointStore(tmp_path / "empty").restore_latest(_state()) is None


def test_fingerprint_order_is_canonical_and_sensitive():
    a = {"b": jnp.ones(2), "a": {"z": jnp.zeros(3), "y": jnp.arange(2)}}
    b = {"a": {"y": jnp.arange(2), "z": jnp.zeros(3)}, "b": jnp.ones(2)}  # same tree, other insertion order
    assert [n for n, _ in named_leaves(a)] == ["a/y", "a/z", "b"]
    assert params_sha256(a) == params_sha256(b)
    assert params_sha256(a) != params_sha256({**a, "b": jnp.ones(2).at[0].set(1.0000001)})
    assert params_sha256(a) != params_sha256({**a, "b": jnp.ones(2, jnp.bfloat16)})  # dtype counts
    assert params_sha256(a) != params_sha256({**a, "b": jnp.ones((1, 2))})  # shape counts


def test_damaged_newer_checkpoint_is_moved_aside_and_its_round_saved_again(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", every=1, keep=3)
    store.save(1, _state(1.0), [{"round": 1}])
    store.save(2, _state(2.0), [{"round": 2}])
    victim = max((p for p in (tmp_path / "ckpt" / "2" / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with victim.open("r+b") as f:  # same size, other bytes: only the manifest's SHA-256 can tell
        f.write(b"\0" * 64)
    skipped = []
    restored = store.restore_latest(_state(0.0), on_skip=skipped.append)
    assert restored.round == 1
    assert "differs from what was saved" in str(skipped[0]) and "moved aside to" in str(skipped[0])
    assert (tmp_path / "ckpt" / "corrupt-2").is_dir() and store.all_rounds() == [1]
    assert store.save(2, _state(2.0), [{"round": 2}])  # no "step already exists"
    assert params_sha256(store.restore_latest(_state(0.0)).state) == params_sha256(_state(2.0))


def test_unfinished_save_is_never_a_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", every=1)
    store.save(1, _state(1.0), [])
    (tmp_path / "ckpt" / ".tmp-2" / "arrays").mkdir(parents=True)  # what a kill mid-save leaves
    assert store.all_rounds() == [1]
    assert CheckpointStore(tmp_path / "ckpt").all_rounds() == [1]
    assert not (tmp_path / "ckpt" / ".tmp-2").exists()  # removed by the next store


def test_none_restorable_moves_nothing_and_says_what_to_do(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", every=1, keep=3)
    for r in (1, 2):
        store.save(r, _state(float(r)), [])
        (tmp_path / "ckpt" / str(r) / "manifest.json").write_text("{")
    with pytest.raises(CheckpointError, match="What to do: nothing was changed"):
        store.restore_latest(_state(0.0))
    assert store.all_rounds() == [1, 2]
