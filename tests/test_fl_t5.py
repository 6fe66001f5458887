"""The federated core on the tiny Flax T5: LoRA and full fine-tuning, backends, reproducibility."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import fl
from fedjax_fm.fl.t5_task import t5_loss_fn, t5_partition
from fedjax_fm.models import LoraConfig, T5, init_params, preset

# One layer each way keeps XLA compile time (the bulk of these tests) small; the
# LoRA dropout still exercises the per-client keys across backends.
CONFIG = preset("tiny", num_layers=1, num_decoder_layers=1, dropout_rate=0.0)
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.1, target_modules=("q", "v"))
CLIENTS, STEPS, BATCH, SRC, TGT = 3, 2, 2, 8, 6


def t5_batches(clients=CLIENTS, seed=0):
    """Random batches in the docs/architecture.md format with [clients, steps] axes and padding."""
    rng = np.random.default_rng(seed)
    shape = (clients, STEPS, BATCH)
    input_ids = rng.integers(2, CONFIG.vocab_size, size=shape + (SRC,)).astype(np.int32)
    src_len = rng.integers(3, SRC + 1, size=shape)
    attention_mask = (np.arange(SRC) < src_len[..., None]).astype(np.int32)
    labels = rng.integers(2, CONFIG.vocab_size, size=shape + (TGT,)).astype(np.int32)
    tgt_len = rng.integers(2, TGT + 1, size=shape)
    decoder_attention_mask = (np.arange(TGT) < tgt_len[..., None]).astype(np.int32)
    labels = labels * decoder_attention_mask
    decoder_input_ids = np.concatenate([np.zeros(shape + (1,), np.int32), labels[..., :-1]], axis=-1)
    example_weight = np.ones(shape, np.float32)
    example_weight[-1, -1, -1] = 0.0  # one padding example
    return {
        "input_ids": input_ids * attention_mask,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "labels": labels,
        "decoder_attention_mask": decoder_attention_mask,
        "example_weight": example_weight,
    }


@pytest.fixture(scope="module")
def setup():
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    lora_update = fl.make_client_update(t5_loss_fn(T5(CONFIG, lora=LORA)), optax.adamw(1e-2))
    full_update = fl.make_client_update(t5_loss_fn(T5(CONFIG), dropout=False), optax.adamw(1e-3))
    return params, lora_update, full_update


def run(update, trainable, frozen, executor, rounds=2, seed=0, server=None):
    algorithm = fl.FederatedAlgorithm(update, server or fl.fedadam(learning_rate=1e-2), executor=executor)
    state = algorithm.init(trainable, seed)
    batches = t5_batches()
    for r in range(rounds):
        ids = fl.sample_clients(seed, r, population=10, clients_per_round=CLIENTS)
        state, metrics = algorithm.round(state, frozen, batches, ids)
    return state, jax.device_get(metrics)


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_lora_round_trains_and_communicates_only_adapters(setup):
    params, lora_update, _ = setup
    trainable, frozen = t5_partition(params, LORA, jax.random.PRNGKey(1))
    assert set(trainable) == {"lora"} and set(frozen) == {"params"}
    assert fl.tree_nbytes(trainable) < fl.tree_nbytes(frozen) / 10
    state, metrics = run(lora_update, trainable, frozen, fl.Sequential())
    assert jax.tree.structure(state.params) == jax.tree.structure(trainable)
    assert max_diff(state.params, trainable) > 0  # adapters moved (B left zero)
    assert np.all(np.isfinite(metrics["client_loss"])) and bool(metrics["applied"])
    assert list(metrics["client_steps"]) == [STEPS] * CLIENTS
    b = t5_batches()
    w = b["example_weight"]
    expected_tokens = (b["attention_mask"] * w[..., None]).sum((1, 2, 3)) + (b["decoder_attention_mask"] * w[..., None]).sum((1, 2, 3))
    np.testing.assert_allclose(metrics["client_tokens"], expected_tokens)
    np.testing.assert_allclose(metrics["client_num_examples"], w.sum((1, 2)))


@pytest.mark.parametrize("executor", [fl.Vmapped(), fl.Sharded()], ids=["vmapped", "sharded"])
def test_t5_lora_backends_equal_sequential(setup, executor):
    params, lora_update, _ = setup
    trainable, frozen = t5_partition(params, LORA, jax.random.PRNGKey(1))
    seq, seq_metrics = run(lora_update, trainable, frozen, fl.Sequential())
    other, metrics = run(lora_update, trainable, frozen, executor)
    assert max_diff(other.params, seq.params) <= 1e-6
    np.testing.assert_allclose(metrics["client_loss"], seq_metrics["client_loss"], atol=1e-5)


def test_full_finetuning_same_code_and_bit_identical_reruns(setup):
    params, _, full_update = setup
    trainable, frozen = t5_partition(params)
    assert set(trainable) == {"params"} and frozen == {}
    a, metrics = run(full_update, trainable, frozen, fl.Sequential(), server=fl.fedavg())
    b, _ = run(full_update, trainable, frozen, fl.Sequential(), server=fl.fedavg())
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert max_diff(a.params, trainable) > 0 and bool(metrics["applied"])
