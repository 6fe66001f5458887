"""Packing wired into the run layer: config, packed client rounds, executors, counts, useful FLOPs.

(Parity of the packed model with the unpacked one is ``test_packing.py``; kill +
``--resume`` bit-identity with packing on is ``test_experiment_run.py``, whose tiny
config inherits ``data.packing`` from ``configs/default.yaml``.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import fl
from fedjax_fm.config import ConfigError, config_from_dict
from fedjax_fm.data import DataSpec, LocalWork, build_federated_data, synthetic_examples
from fedjax_fm.data.federated import PackingConfig, SourceSpec
from fedjax_fm.data.packing import PACKED_KEYS, example_lengths, packed_example_count, padding_efficiency
from fedjax_fm.data.records import DataError
from fedjax_fm.data.synthetic import SAMSUM_UTTERANCE_BUCKETS
from fedjax_fm.fl.t5_task import t5_loss_fn, t5_partition
from fedjax_fm.models import LoraConfig, T5, init_params, preset
from fedjax_fm.models.flops import ExampleFlops, train_step_flops
from fedjax_fm.training.round import useful_train_flops
from transformers import ByT5Tokenizer

CONFIG = preset("tiny", num_layers=1, num_decoder_layers=1, dropout_rate=0.0, vocab_size=384)
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q", "v"))


def _data(packing: bool, *, steps=2, epochs=None, batch=3, seed=0):
    spec = DataSpec(source=SourceSpec(kind="synthetic", num_train=60, num_eval=4), max_input_length=160,
                    max_target_length=48,
                    packing=PackingConfig(enabled=packing, input_length=480, target_length=144, window=32))
    work = LocalWork(batch, steps=steps) if epochs is None else LocalWork(batch, epochs=epochs)
    return build_federated_data(spec, ByT5Tokenizer(), seed=seed, local_work=work, eval_batch_size=4, num_clients=3)


@pytest.fixture(scope="module")
def packed():
    return _data(True)


def test_packing_config_section_and_its_checks():
    cfg = config_from_dict({"data": {"packing": {"enabled": True, "input_length": 600, "target_length": 100}}})
    assert cfg.data.packing_spec().input_length == 600
    assert config_from_dict({}).data.packing_spec() is None  # off unless asked for
    with pytest.raises(ConfigError, match="at least the truncation"):
        config_from_dict({"data": {"packing": {"enabled": True, "input_length": 256}}})  # < max_input_length 512
    with pytest.raises(ConfigError, match="valid keys"):
        config_from_dict({"data": {"packing": {"enable": True}}})


def test_packed_rounds_have_static_shapes_and_are_pure_in_seed_round_client(packed):
    a = packed.clients_round_batches([0, 2], 5)
    shapes = packed.batch_shapes()
    for key, value in a.items():
        assert value.shape == (2, *shapes[key]), key
    assert set(PACKED_KEYS) <= set(a)
    b = packed.clients_round_batches([0, 2], 5)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # A client's round does not depend on which group it runs in, but does on the round.
    alone = packed.client_round_batches(2, 5)
    for key in a:
        np.testing.assert_array_equal(a[key][1], alone[key])
    assert not np.array_equal(packed.client_round_batches(2, 6)["input_ids"], alone["input_ids"])
    # A rebuilt FederatedData (a resumed process) packs the same rows.
    again = _data(True).client_round_batches(2, 5)
    for key in a:
        np.testing.assert_array_equal(again[key], alone[key])


def test_packed_rows_fill_the_slots_and_count_examples(packed):
    unpacked = _data(False)
    p, u = packed.clients_round_batches([0, 1, 2], 0), unpacked.clients_round_batches([0, 1, 2], 0)
    assert padding_efficiency(p) > 0.8
    assert packed_example_count(p) > packed_example_count(u)
    src, tgt = example_lengths(p)
    assert len(src) == packed_example_count(p)
    w = p["example_weight"][..., None]
    assert src.sum() == (p["attention_mask"] * w).sum() and tgt.sum() == (p["decoder_attention_mask"] * w).sum()


def test_local_epochs_pack_every_example_once():
    data = _data(True, steps=None, epochs=1.0)
    for c in range(data.num_clients):
        batch = data.client_round_batches(c, 3)
        assert packed_example_count(batch) == data.num_examples(c)


def test_useful_flops_count_each_example_at_its_own_length(packed):
    batch = packed.client_round_batches(0, 0)
    counter = ExampleFlops(CONFIG, LORA)
    src, tgt = example_lengths(batch)
    expected = sum(train_step_flops(CONFIG, 1, int(s), int(t), lora=LORA).total for s, t in zip(src, tgt))
    assert useful_train_flops(counter, batch) == expected
    rows = batch["example_weight"].size
    padded = train_step_flops(CONFIG, rows, batch["input_ids"].shape[-1], batch["labels"].shape[-1], lora=LORA).total
    assert 0 < expected < padded  # less than the padded rows' work: attention only within segments


def test_vmapped_and_sequential_packed_clients_agree(packed):
    params = init_params(CONFIG, jax.random.PRNGKey(0))
    trainable, frozen = t5_partition(params, LORA, jax.random.PRNGKey(1))
    update = fl.make_client_update(t5_loss_fn(T5(CONFIG, lora=LORA), dropout=False), optax.adamw(1e-2))
    ids = np.asarray([0, 2])
    batches = packed.clients_round_batches([0, 2], 1)
    out = {}
    for name, executor in (("seq", fl.Sequential()), ("vmap", fl.Vmapped())):
        algorithm = fl.FederatedAlgorithm(update, fl.fedadam(learning_rate=1e-2), executor=executor)
        state = algorithm.init(trainable, 0)
        out[name] = jax.device_get(algorithm.round(state, frozen, batches, ids))
    (seq, seq_metrics), (vm, vm_metrics) = out["seq"], out["vmap"]
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(seq.params), jax.tree.leaves(vm.params)))
    assert diff <= 1e-6
    np.testing.assert_allclose(vm_metrics["client_loss"], seq_metrics["client_loss"], atol=1e-5)
    np.testing.assert_array_equal(vm_metrics["client_num_examples"],
                                  [packed_example_count(packed.client_round_batches(c, 1)) for c in (0, 2)])


def test_synthetic_dialogues_have_samsum_lengths():
    examples = synthetic_examples(800, seed=3)
    utterances = np.asarray([d.count("\n") + 1 for d in examples.inputs])
    assert utterances.min() >= 3 and utterances.max() <= 30
    shares = [np.mean((utterances >= lo) & (utterances <= hi)) for lo, hi in SAMSUM_UTTERANCE_BUCKETS]
    assert all(0.18 < s < 0.32 for s in shares), shares  # about a quarter each
    assert (utterances >= 28).sum() > 0  # the long ones exist
    short = synthetic_examples(50, seed=3, lengths="small_talk")
    assert max(d.count("\n") + 1 for d in short.inputs) <= 11  # the older, short dialogues


def test_packing_too_short_for_the_truncation_limit_is_refused():
    with pytest.raises(DataError, match="at least the truncation"):
        DataSpec(max_input_length=512, packing=PackingConfig(enabled=True, input_length=256))
