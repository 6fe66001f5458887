"""Analytic FLOP counts (fedjax_fm.models.flops) against XLA's cost analysis of the real model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from fedjax_fm.models.config import LoraConfig, T5Config, preset
from fedjax_fm.models.flops import (
    ExampleFlops,
    decode_step_flops,
    encode_flops,
    forward_flops,
    generation_flops,
    train_step_flops,
)
from fedjax_fm.models.loss import batch_loss
from fedjax_fm.models.t5 import T5, init_params

# Wide enough that matmuls dominate the elementwise work XLA also counts (norms,
# softmax, GELU, the loss), small enough to compile in seconds.
CONFIG = T5Config(vocab_size=512, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2,
                  num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=64,
                  dropout_rate=0.0)
B, S, T = 2, 64, 32
LORA = LoraConfig(rank=8, alpha=16.0, dropout=0.0, target_modules=("q", "v"))


@pytest.fixture(autouse=True)
def xla_attention_only(monkeypatch):
    """XLA's cost analysis cannot see inside the fused CPU attention kernel (a custom
    call, counted as 0 FLOPs), so the formulas are checked against XLA's own attention."""
    monkeypatch.setenv("FEDJAX_FM_CPU_ATTENTION", "0")


def xla_flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


def make_batch():
    ones = lambda n: jnp.ones((B, n), jnp.int32)  # noqa: E731
    return dict(input_ids=ones(S), attention_mask=ones(S), decoder_input_ids=ones(T), labels=ones(T),
                decoder_attention_mask=ones(T), example_weight=jnp.ones((B,), jnp.float32))


def lora_adapters(params, lora: LoraConfig):
    """Adapters per the architecture contract: collection "lora", .../q/lora_A [in, r], lora_B [r, out]."""
    adapters = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] == "kernel" and path[-2] in lora.target_modules:
            adapters[path[:-1] + ("lora_A",)] = jnp.full((leaf.shape[0], lora.rank), 0.01)
            adapters[path[:-1] + ("lora_B",)] = jnp.full((lora.rank, leaf.shape[1]), 0.01)
    return traverse_util.unflatten_dict(adapters)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.PRNGKey(0))


def test_full_finetuning_step_matches_xla(params):
    model = T5(CONFIG)
    step = lambda p, b: jax.grad(lambda p: batch_loss(model, {"params": p}, b)[0])(p)  # noqa: E731
    analytic = train_step_flops(CONFIG, B, S, T)
    assert analytic.total == pytest.approx(xla_flops(step, params, make_batch()), rel=0.10)
    assert analytic.backward == 2 * analytic.forward  # dX and dW for every product


def test_lora_step_matches_xla_and_skips_frozen_weight_gradients(params):
    model = T5(CONFIG, lora=LORA)
    adapters = lora_adapters(params, LORA)
    step = lambda a, p, b: jax.grad(  # noqa: E731
        lambda a: batch_loss(model, {"params": p, "lora": a}, b)[0])(a)
    analytic = train_step_flops(CONFIG, B, S, T, lora=LORA)
    assert analytic.total == pytest.approx(xla_flops(step, adapters, params, make_batch()), rel=0.10)
    full = train_step_flops(CONFIG, B, S, T)
    assert analytic.total < full.total
    assert analytic.forward > forward_flops(CONFIG, B, S, T)  # adapters add forward work


def test_forward_encode_and_decode_step_match_xla(params):
    model = T5(CONFIG)
    batch = make_batch()
    forward = lambda p, b: batch_loss(model, {"params": p}, b)[0]  # noqa: E731
    assert forward_flops(CONFIG, B, S, T) == pytest.approx(xla_flops(forward, params, batch), rel=0.10)
    encode = lambda p, x: model.apply({"params": p}, x, method=T5.encode)  # noqa: E731
    assert encode_flops(CONFIG, B, S) == pytest.approx(xla_flops(encode, params, batch["input_ids"]), rel=0.10)
    cache_len = 32
    encoded = jnp.ones((B, S, CONFIG.d_model))
    cache = model.apply({"params": params}, encoded, cache_len, method=T5.init_cache)
    step = lambda p, tok, c: model.apply({"params": p}, tok, c, jnp.int32(3), method=T5.decode_step)  # noqa: E731
    measured = xla_flops(step, params, jnp.ones((B,), jnp.int32), cache)
    # The fixed-shape cache multiplies by all cache_len keys (masked).
    assert decode_step_flops(CONFIG, B, S, keys=cache_len) == pytest.approx(measured, rel=0.10)


def test_example_flops_attention_is_the_attention_core_of_each_example():
    c = preset("flan-t5-small")
    lora = LoraConfig(rank=8, alpha=16.0, dropout=0.0, target_modules=("q", "v"))
    counts = ExampleFlops(c, lora)
    lengths = ([100, 30, 0], [20, 7, 0])  # the third is an empty slot: not counted
    assert counts(*lengths) == sum(train_step_flops(c, 1, s, t, lora=lora).total for s, t in [(100, 20), (30, 7)])
    alone = [train_step_flops(c, 1, s, t, lora=lora).attention for s, t in [(100, 20), (30, 7)]]
    assert counts.attention(*lengths) == sum(alone) > 0
    # Packed into one row of 130 / 27, the dense part is the same but attention costs more.
    row = train_step_flops(c, 1, 130, 27, lora=lora)
    assert row.attention > counts.attention(*lengths)
    assert row.total - row.attention == counts(*lengths) - counts.attention(*lengths)


def test_known_closed_forms():
    c = preset("flan-t5-small")
    b, s, t = 4, 128, 32
    d, i, f, v = c.d_model, c.inner_dim, c.d_ff, c.vocab_size
    encoder = c.num_layers * (2 * b * s * 4 * d * i + 4 * b * s * s * i + 2 * b * s * 3 * d * f)
    decoder = c.num_decoder_layers * (
        2 * b * t * 4 * d * i + 4 * b * t * t * i + 2 * b * t * 2 * d * i + 2 * b * s * 2 * d * i
        + 4 * b * t * s * i + 2 * b * t * 3 * d * f
    )
    assert forward_flops(c, b, s, t) == encoder + decoder + 2 * b * t * d * v
    assert train_step_flops(c, b, s, t).total == 3 * (encoder + decoder + 2 * b * t * d * v)
    # The attention core: scores and weighted sums (4 b q k i each attention), x3 in full training.
    core = c.num_layers * 4 * b * s * s * i + c.num_decoder_layers * (4 * b * t * t * i + 4 * b * t * s * i)
    assert train_step_flops(c, b, s, t).attention == 3 * core
    assert forward_flops(c, b, s, t) - core == (
        train_step_flops(c, b, s, t).total - train_step_flops(c, b, s, t).attention) // 3
    causal = generation_flops(c, b, s, 16)
    assert generation_flops(c, b, s, 16, attend_full_cache=True) > causal > encode_flops(c, b, s)
    # Beam search: the encoder once per row, everything else on num_beams times the rows.
    assert generation_flops(c, b, s, 16, num_beams=3) - encode_flops(c, b, s) == 3 * (causal - encode_flops(c, b, s))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        forward_flops(c, 0, s, t)
