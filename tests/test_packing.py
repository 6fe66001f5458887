"""Packing: the packer (pure NumPy), the segment-aware T5 against unpacked runs and PyTorch,
the loss and gradients, and packed client updates on every execution backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from fedjax_fm import fl, models
from fedjax_fm.data.batching import real_examples_per_round
from fedjax_fm.data.packing import (
    PACKED_KEYS,
    PackingSpec,
    first_fit,
    pack_examples,
    pack_round,
    pack_rows,
    packed_example_count,
    padding_efficiency,
    rows_needed,
)
from fedjax_fm.data.records import DataError
from fedjax_fm.data.tokenize import TokenizedExamples
from fedjax_fm.fl.t5_task import t5_loss_fn, t5_partition
from fedjax_fm.models.config import LoraConfig, T5Config
from fedjax_fm.models.layers import relative_position_bucket
from fedjax_fm.models.lora import init_lora
from fedjax_fm.models.loss import BATCH_KEYS, batch_loss, shift_right_packed
from fedjax_fm.models.t5 import T5, init_params

# Small buckets and max distance so that offsets inside a packed row reach the
# logarithmic buckets (bidirectional: exact below 2, log up to 20).
TINY = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20)
FLAVOURS = {
    "gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}
SRC, TGT = 9, 6            # tokenisation maxima
ROW_SRC, ROW_TGT = 24, 14  # packed row lengths
SPEC = PackingSpec(ROW_SRC, ROW_TGT, max_segments=4, window=6)


def random_tokens(n: int, seed: int = 0, src: int = SRC, tgt: int = TGT, vocab: int = 97) -> TokenizedExamples:
    """Tokenised examples of random lengths, real tokens in [2, vocab), each ending in EOS (1)."""
    rng = np.random.default_rng(seed)
    input_lengths = rng.integers(1, src + 1, n).astype(np.int32)
    label_lengths = rng.integers(1, tgt + 1, n).astype(np.int32)

    def fill(lengths, width):
        ids = rng.integers(2, vocab, (n, width)).astype(np.int32)
        ids[np.arange(n), lengths - 1] = 1
        return np.where(np.arange(width) < lengths[:, None], ids, 0).astype(np.int32)

    return TokenizedExamples(fill(input_lengths, src), input_lengths, fill(label_lengths, tgt), label_lengths)


def packed_and_unpacked(tokens: TokenizedExamples, num_rows: int, seed: int = 0):
    """A packed batch of all examples, and the same examples one per row (unpacked)."""
    packed = pack_examples(tokens, np.arange(len(tokens)), num_rows=num_rows, spec=SPEC, rng=np.random.default_rng(seed))
    assert packed.leftover.size == 0
    unpacked = tokens.gather(np.arange(len(tokens)))
    unpacked["example_weight"] = np.ones(len(tokens), np.float32)
    return packed, unpacked


# ---------------------------------------------------------------- the packer


def test_packer_is_deterministic_for_a_seed():
    tokens = random_tokens(40)
    a = pack_examples(tokens, np.arange(40), num_rows=30, spec=SPEC, rng=np.random.default_rng(3))
    b = pack_examples(tokens, np.arange(40), num_rows=30, spec=SPEC, rng=np.random.default_rng(3))
    c = pack_examples(tokens, np.arange(40), num_rows=30, spec=SPEC, rng=np.random.default_rng(4))
    assert a.rows == b.rows
    for key in a.batch:
        np.testing.assert_array_equal(a.batch[key], b.batch[key])
    assert a.rows != c.rows


@pytest.mark.parametrize("window", [None, 1, 5, 40])
def test_every_example_once_no_overflow_consistent_segments(window):
    tokens = random_tokens(40, seed=1)
    spec = PackingSpec(ROW_SRC, ROW_TGT, max_segments=3, window=window)
    packed = pack_examples(tokens, np.arange(100, 140) - 100, num_rows=40, spec=spec, rng=np.random.default_rng(0))
    placed = [i for row in packed.rows for i in row]
    assert sorted(placed + list(packed.leftover)) == list(range(40)) and packed.leftover.size == 0
    b = packed.batch
    assert set(PACKED_KEYS) <= set(b) and set(BATCH_KEYS) <= set(b)
    assert b["input_ids"].shape == (40, ROW_SRC) and b["labels"].shape == (40, ROW_TGT)
    for r, row in enumerate(packed.rows):
        assert len(row) <= 3
        assert tokens.input_lengths[row].sum() <= ROW_SRC and tokens.label_lengths[row].sum() <= ROW_TGT
        assert b["example_weight"][r] == (1.0 if row else 0.0)
        for side, ids_key, length_of, src_ids in (
            ("encoder", "input_ids", tokens.input_lengths, tokens.input_ids),
            ("decoder", "labels", tokens.label_lengths, tokens.labels),
        ):
            seg, pos = b[f"{side}_segment_ids"][r], b[f"{side}_positions"][r]
            mask = b["attention_mask" if side == "encoder" else "decoder_attention_mask"][r]
            np.testing.assert_array_equal(mask, (seg > 0).astype(np.int32))
            # Segments 1..k, contiguous, in order, then padding; positions restart at 0.
            expected_seg = np.concatenate([np.full(length_of[i], k + 1) for k, i in enumerate(row)] + [np.zeros(0)])
            n = len(expected_seg)
            np.testing.assert_array_equal(seg[:n], expected_seg)
            assert not seg[n:].any() and not pos[n:].any() and not b[ids_key][r, n:].any()
            np.testing.assert_array_equal(pos[:n], np.concatenate([np.arange(length_of[i]) for i in row] + [np.zeros(0)]))
            # The tokens are the example's own.
            start = 0
            for i in row:
                np.testing.assert_array_equal(b[ids_key][r, start : start + length_of[i]], src_ids[i, : length_of[i]])
                start += length_of[i]
    # Decoder inputs are the labels shifted right within each segment.
    np.testing.assert_array_equal(
        b["decoder_input_ids"], np.asarray(shift_right_packed(jnp.asarray(b["labels"]), jnp.asarray(b["decoder_segment_ids"])))
    )
    assert packed_example_count(b) == 40 == real_examples_per_round(b)


def test_first_fit_places_in_the_lowest_row_that_fits():
    spec = PackingSpec(10, 10)
    # 6 and 5 do not share a row; 4 fits beside 6; 3 fits beside 5 (row 0 is full).
    assert first_fit(np.array([6, 5, 4, 3]), np.array([1, 1, 1, 1]), spec) == [[0, 2], [1, 3]]
    # The target side decides too.
    assert first_fit(np.array([1, 1]), np.array([6, 5]), spec) == [[0], [1]]
    assert first_fit(np.array([1, 1, 1]), np.array([1, 1, 1]), PackingSpec(10, 10, max_segments=2)) == [[0, 1], [2]]


def test_windows_close_their_rows():
    # Window 2: examples of the second window never join the first window's rows.
    rows = pack_rows(np.ones(4, int), np.ones(4, int), PackingSpec(10, 10, window=2), np.random.default_rng(0))
    assert [sorted(r) for r in rows] == [[0, 1], [2, 3]]


def test_padding_efficiency_known_case():
    tokens = TokenizedExamples(
        np.array([[5, 6, 1, 0], [7, 8, 9, 1]], np.int32), np.array([3, 4], np.int32),
        np.array([[4, 1, 0], [5, 6, 1]], np.int32), np.array([2, 3], np.int32),
    )
    packed = pack_examples(tokens, [0, 1], num_rows=2, spec=PackingSpec(8, 5), rng=np.random.default_rng(0))
    assert len(packed.rows[0]) == 2 and not packed.rows[1]
    # real (3 + 4) + (2 + 3) = 12 of 2 * 8 + 2 * 5 = 26 slots
    assert padding_efficiency(packed.batch) == pytest.approx(12 / 26)
    unpacked = tokens.gather(np.array([0, 1]))
    unpacked["example_weight"] = np.array([1.0, 0.0], np.float32)  # a weight-0 repeat is padding
    assert padding_efficiency(unpacked) == pytest.approx((3 + 2) / (8 + 6))


def test_over_long_examples_are_refused():
    tokens = random_tokens(4)
    with pytest.raises(DataError, match="shorter than the tokenised maximum"):
        pack_examples(tokens, np.arange(4), num_rows=4, spec=PackingSpec(SRC - 1, TGT), rng=np.random.default_rng(0))
    with pytest.raises(DataError, match="do not fit an empty packed row"):
        first_fit(np.array([3, 11]), np.array([1, 1]), PackingSpec(10, 10))


def test_leftover_when_rows_run_out():
    tokens = random_tokens(30, seed=2)
    packed = pack_examples(tokens, np.arange(30), num_rows=3, spec=SPEC, rng=np.random.default_rng(0))
    placed = [i for row in packed.rows for i in row]
    assert len(packed.rows) == 3 and packed.leftover.size > 0
    assert sorted(placed + list(packed.leftover)) == list(range(30))


def test_pack_round_local_epochs_and_local_steps():
    tokens = random_tokens(50, seed=3)
    client = np.arange(10, 30)
    kwargs = dict(seed=7, round_index=2, client=1, spec=SPEC)
    # local_epochs: exactly the round's examples, each once (E = 1), rest padding rows.
    epochs = pack_round(tokens, client, num_rows=16, num_examples=20, **kwargs)
    assert sorted(i for row in epochs.rows for i in row) == list(client)
    assert packed_example_count(epochs.batch) == 20
    again = pack_round(tokens, client, num_rows=16, num_examples=20, **kwargs)
    assert again.rows == epochs.rows
    needed = sum(1 for row in epochs.rows if row)
    with pytest.raises(DataError, match="packed rows"):
        pack_round(tokens, client, num_rows=needed - 1, num_examples=20, **kwargs)
    assert rows_needed(tokens, client, SPEC, np.random.default_rng(0)) >= 1
    # local_steps: every row holds examples; the count is what the rows hold.
    steps = pack_round(tokens, client, num_rows=4, **kwargs)
    assert all(steps.rows) and all(set(row) <= set(client) for row in steps.rows)
    assert packed_example_count(steps.batch) == sum(len(row) for row in steps.rows)


# ---------------------------------------------------------------- the model


def test_relative_positions_equal_row_index_differences_inside_segments():
    """The claim that keeps the bias shared: on every same-segment pair, the bucket of
    (pos_k - pos_q) equals the bucket of (k - q) in row indices."""
    tokens = random_tokens(40, seed=4)
    b = pack_examples(tokens, np.arange(40), num_rows=40, spec=SPEC, rng=np.random.default_rng(0)).batch
    for side, bidirectional in (("encoder", True), ("decoder", False)):
        seg, pos = b[f"{side}_segment_ids"], b[f"{side}_positions"]
        index = np.arange(seg.shape[1])
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
        from_positions = relative_position_bucket(jnp.asarray(pos[:, None, :] - pos[:, :, None]), bidirectional, 8, 20)
        from_rows = relative_position_bucket(jnp.asarray(index[None, :] - index[:, None]), bidirectional, 8, 20)
        np.testing.assert_array_equal(np.where(same, from_positions, 0), np.where(same, np.asarray(from_rows)[None], 0))
        assert same.sum() > seg.shape[0] * 2  # several multi-token segments were checked


def segment_logits(logits: np.ndarray, batch: dict, rows: list[list[int]]) -> dict[int, np.ndarray]:
    """Each example's target logits, cut from its segment of a packed row."""
    out = {}
    for r, row in enumerate(rows):
        for k, i in enumerate(row, start=1):
            out[i] = logits[r][batch["decoder_segment_ids"][r] == k]
    return out


def apply_packed(model, variables, batch):
    return jax.jit(lambda v, b: model.apply(
        v, b["input_ids"], b["attention_mask"], b["decoder_input_ids"], b["decoder_attention_mask"],
        encoder_segment_ids=b["encoder_segment_ids"], decoder_segment_ids=b["decoder_segment_ids"]))(
        variables, {k: jnp.asarray(v) for k, v in batch.items()})


def apply_unpacked(model, variables, batch):
    return jax.jit(lambda v, b: model.apply(
        v, b["input_ids"], b["attention_mask"], b["decoder_input_ids"], b["decoder_attention_mask"]))(
        variables, {k: jnp.asarray(v) for k, v in batch.items()})


def randomised_lora(params, lora: LoraConfig, seed: int = 1):
    adapters = init_lora(params, lora, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(rng.normal(scale=0.1, size=x.shape), x.dtype) if path[-1].key == "lora_B" else x,
        adapters,
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_packed_logits_equal_each_example_alone(flavour, lora):
    config = T5Config(**TINY, **FLAVOURS[flavour])
    lora_config = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q", "k", "v", "o", "wo")) if lora else None
    model = T5(config, lora=lora_config)
    params = init_params(config, jax.random.PRNGKey(0))
    variables = {"params": params}
    if lora:
        variables["lora"] = randomised_lora(params, lora_config)
    tokens = random_tokens(14, seed=5)
    packed, unpacked = packed_and_unpacked(tokens, num_rows=8)
    assert max(len(row) for row in packed.rows) >= 3  # real packing happened
    packed_logits = np.asarray(apply_packed(model, variables, packed.batch))
    alone = np.asarray(apply_unpacked(model, variables, unpacked))  # one example per row
    per_example = segment_logits(packed_logits, packed.batch, packed.rows)
    assert sorted(per_example) == list(range(14))
    # The attention is bit-identical per example (tests/test_cpu_attention.py); the dense
    # layers are not: XLA's CPU dot picks its blocking from the batch's shape, so a row of
    # 3 examples sums in another order than a row of 1. Measured on an AVX2 EPYC: up to 6
    # ulps of the largest logit (1.4e-5 at 18.6 with the kernel, 8.6e-6 at 20.5 with XLA's
    # attention), so the bound is 16 ulps of it, not a fixed 1e-5 that another CPU crosses.
    want = {i: alone[i, : tokens.label_lengths[i]] for i in per_example}
    scale = max(float(np.abs(w).max()) for w in want.values())
    tolerance = 16 * np.finfo(np.float32).eps * max(scale, 1.0)
    for i, got in per_example.items():
        np.testing.assert_allclose(got, want[i], atol=tolerance, rtol=0)


def test_packed_loss_and_gradients_equal_unpacked():
    config = T5Config(**TINY, **FLAVOURS["gated-gelu-untied"])
    model = T5(config)
    params = init_params(config, jax.random.PRNGKey(0))
    tokens = random_tokens(14, seed=6)
    packed, unpacked = packed_and_unpacked(tokens, num_rows=8)

    @jax.jit
    def loss_and_grad(p, batch):
        return jax.value_and_grad(lambda q: batch_loss(model, {"params": q}, batch), has_aux=True)(p)

    (loss_p, tokens_p), grad_p = loss_and_grad(params, {k: jnp.asarray(v) for k, v in packed.batch.items()})
    (loss_u, tokens_u), grad_u = loss_and_grad(params, {k: jnp.asarray(v) for k, v in unpacked.items()})
    assert float(tokens_p) == float(tokens_u) == tokens.label_lengths.sum()
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
    for (path, gp), gu in zip(jax.tree_util.tree_leaves_with_path(grad_p), jax.tree.leaves(grad_u)):
        scale = float(jnp.max(jnp.abs(gu)))
        assert float(jnp.max(jnp.abs(gp - gu))) <= 1e-5 * max(scale, 1e-6), jax.tree_util.keystr(path)
    # The segment ids are what makes it so: the same rows without them mix the examples.
    mixed = {k: jnp.asarray(v) for k, v in packed.batch.items() if k not in PACKED_KEYS}
    assert abs(float(batch_loss(model, {"params": params}, mixed)[0]) - float(loss_u)) > 1e-3


def test_segment_ids_must_come_in_pairs():
    config = T5Config(**TINY)
    tokens = random_tokens(4)
    packed, _ = packed_and_unpacked(tokens, num_rows=4)
    batch = dict(packed.batch)
    del batch["encoder_segment_ids"]
    with pytest.raises(KeyError, match="partner"):
        batch_loss(T5(config), {"params": init_params(config, jax.random.PRNGKey(0))}, batch)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_packed_segments_match_pytorch_examples_alone(tmp_path, flavour):
    torch.manual_seed(0)
    hf_model = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, **FLAVOURS[flavour], decoder_start_token_id=0))
    if not FLAVOURS[flavour]["tie_word_embeddings"]:
        hf_model.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf_model.shared.weight))
    hf_model.eval()
    hf_model.save_pretrained(tmp_path)
    model, params = models.from_pretrained(tmp_path)
    tokens = random_tokens(10, seed=7)
    packed, _ = packed_and_unpacked(tokens, num_rows=6)
    per_example = segment_logits(np.asarray(apply_packed(model, {"params": params}, packed.batch)), packed.batch, packed.rows)
    for i, got in per_example.items():
        src = torch.tensor(tokens.input_ids[i : i + 1, : tokens.input_lengths[i]].astype(np.int64))
        labels = tokens.labels[i : i + 1, : tokens.label_lengths[i]].astype(np.int64)
        with torch.no_grad():  # the example alone, unpadded, through HF's own shift_right
            want = hf_model(input_ids=src, labels=torch.tensor(labels)).logits[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- federated


def test_packed_client_updates_vmapped_equal_sequential():
    config = models.preset("tiny", num_layers=1, num_decoder_layers=1, dropout_rate=0.0)
    lora_config = LoraConfig(rank=4, alpha=8.0, dropout=0.1, target_modules=("q", "v"))
    params = init_params(config, jax.random.PRNGKey(0))
    trainable, frozen = t5_partition(params, lora_config, jax.random.PRNGKey(1))
    update = fl.make_client_update(t5_loss_fn(T5(config, lora=lora_config)), optax.adamw(1e-2))
    tokens = random_tokens(60, seed=8)
    steps, rows = 2, 3
    clients = [np.arange(0, 12), np.arange(12, 40), np.arange(40, 45)]
    rounds = [
        pack_round(tokens, idx, seed=0, round_index=0, client=c, num_rows=steps * rows, spec=SPEC,
                   num_examples=len(idx) if c != 1 else None)
        for c, idx in enumerate(clients)
    ]
    batches = {k: np.stack([p.batch[k].reshape(steps, rows, *p.batch[k].shape[1:]) for p in rounds])
               for k in rounds[0].batch}
    expected_examples = [packed_example_count(p.batch) for p in rounds]
    assert expected_examples[0] == 12 and expected_examples[2] == 5
    np.testing.assert_allclose(real_examples_per_round(batches), expected_examples)
    expected_tokens = [p.batch["attention_mask"].sum() + p.batch["decoder_attention_mask"].sum() for p in rounds]

    def run(executor):
        algorithm = fl.FederatedAlgorithm(update, fl.fedavg(), executor=executor)
        state = algorithm.init(trainable, 0)
        state, metrics = algorithm.round(state, frozen, batches, np.arange(3))
        return state, jax.device_get(metrics)

    seq, seq_metrics = run(fl.Sequential())
    vec, vec_metrics = run(fl.Vmapped())
    np.testing.assert_allclose(seq_metrics["client_num_examples"], expected_examples)
    np.testing.assert_allclose(seq_metrics["client_tokens"], expected_tokens)
    assert np.all(np.isfinite(seq_metrics["client_loss"])) and bool(seq_metrics["applied"])
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(seq.params), jax.tree.leaves(vec.params))) <= 1e-6
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(seq.params), jax.tree.leaves(trainable))) > 0
    np.testing.assert_allclose(vec_metrics["client_loss"], seq_metrics["client_loss"], atol=1e-5)
    np.testing.assert_allclose(vec_metrics["client_num_examples"], expected_examples)
