"""The Flax T5 against Hugging Face's PyTorch T5 on tiny random models of both flavours."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fedjax_fm import models
from fedjax_fm.models.config import LoraConfig, T5Config, preset
from fedjax_fm.models.layers import relative_position_bucket
from fedjax_fm.models.loss import batch_loss, seq2seq_cross_entropy, shift_right
from fedjax_fm.models.t5 import T5, init_params

TINY = dict(vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20)
# Fewer blocks keep compile times (which dominate these tests) low; the parity tests
# above use two or more blocks per stack, covering the shared position bias.
SMALL = dict(num_layers=1, num_decoder_layers=2)
FLAVOURS = {
    "gated-gelu-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "relu-tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
}


def hf_checkpoint(tmp_path, flavour: str, seed: int = 0):
    """A random tiny HF T5 (eval mode), saved to tmp_path and loaded back with our loader."""
    torch.manual_seed(seed)
    hf_config = transformers.T5Config(**TINY, **FLAVOURS[flavour], dropout_rate=0.1)
    hf_model = transformers.T5ForConditionalGeneration(hf_config)
    if not FLAVOURS[flavour]["tie_word_embeddings"]:
        # transformers 5 builds T5 with the head tied; FLAN-T5 checkpoints have their own.
        hf_model.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf_model.shared.weight))
    hf_model.eval()
    hf_model.save_pretrained(tmp_path)
    model, params = models.from_pretrained(tmp_path)
    return hf_model, model, params


def padded_batch(rng: np.random.Generator, batch=3, src=11, tgt=7, vocab=97):
    """Inputs with padding at the end of rows in both encoder and decoder."""
    src_lens = np.array([src, src - 4, 3])[:batch]
    tgt_lens = np.array([tgt, 2, tgt - 3])[:batch]
    input_ids = rng.integers(2, vocab, size=(batch, src))
    attention_mask = (np.arange(src)[None] < src_lens[:, None]).astype(np.int64)
    labels = rng.integers(2, vocab, size=(batch, tgt))
    decoder_attention_mask = (np.arange(tgt)[None] < tgt_lens[:, None]).astype(np.int64)
    input_ids = input_ids * attention_mask
    labels = labels * decoder_attention_mask
    return input_ids, attention_mask, labels, decoder_attention_mask


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_logits_and_loss_match_pytorch_with_padding(tmp_path, flavour):
    hf_model, model, params = hf_checkpoint(tmp_path, flavour)
    assert model.config.tie_word_embeddings == FLAVOURS[flavour]["tie_word_embeddings"]
    input_ids, attention_mask, labels, decoder_attention_mask = padded_batch(np.random.default_rng(1))
    decoder_input_ids = np.asarray(shift_right(jnp.asarray(labels)))

    with torch.no_grad():
        hf_labels = torch.tensor(np.where(decoder_attention_mask > 0, labels, -100))
        hf_out = hf_model(
            input_ids=torch.tensor(input_ids),
            attention_mask=torch.tensor(attention_mask),
            decoder_input_ids=torch.tensor(decoder_input_ids),
            decoder_attention_mask=torch.tensor(decoder_attention_mask),
            labels=hf_labels,
        )
    logits = jit_apply(model)({"params": params}, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
    assert logits.shape == (3, 7, TINY["vocab_size"])
    np.testing.assert_allclose(np.asarray(logits), hf_out.logits.numpy(), atol=1e-4, rtol=0)

    loss, num_tokens = seq2seq_cross_entropy(logits, labels, decoder_attention_mask)
    assert float(num_tokens) == decoder_attention_mask.sum()
    np.testing.assert_allclose(float(loss), float(hf_out.loss), atol=1e-5, rtol=1e-5)


def test_shift_right_matches_pytorch():
    labels = np.array([[5, 6, 1, 0], [7, -100, -100, -100]])
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, decoder_start_token_id=0))._shift_right(torch.tensor(labels))
    np.testing.assert_array_equal(np.asarray(shift_right(jnp.asarray(labels))), hf.numpy())


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_pytorch(bidirectional):
    relative = np.arange(-300, 301)[None, :]
    ours = relative_position_bucket(jnp.asarray(relative), bidirectional, num_buckets=32, max_distance=128)
    theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        torch.tensor(relative), bidirectional=bidirectional, num_buckets=32, max_distance=128
    )
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_param_tree_follows_the_naming_table():
    def shapes(config):  # abstract init: names and shapes without compiling anything
        return jax.eval_shape(lambda r: init_params(config, r), jax.random.PRNGKey(0))

    gated = shapes(preset("tiny"))
    names = set(flax.traverse_util.flatten_dict(gated, sep="/"))
    for name in [
        "shared/embedding",
        "encoder/block_0/layer_0/SelfAttention/q/kernel",
        "encoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding",
        "encoder/block_1/layer_1/DenseReluDense/wi_0/kernel",
        "encoder/final_layer_norm/scale",
        "decoder/block_0/layer_0/SelfAttention/relative_attention_bias/embedding",
        "decoder/block_1/layer_1/EncDecAttention/o/kernel",
        "decoder/block_1/layer_2/DenseReluDense/wo/kernel",
        "decoder/block_1/layer_2/layer_norm/scale",
        "lm_head/kernel",
    ]:
        assert name in names, name
    assert not any("relative_attention_bias" in n and "block_0" not in n for n in names)
    relu_tied = shapes(preset("tiny", feed_forward_proj="relu", tie_word_embeddings=True))
    relu_names = set(flax.traverse_util.flatten_dict(relu_tied, sep="/"))
    assert "lm_head/kernel" not in relu_names
    assert "encoder/block_0/layer_1/DenseReluDense/wi/kernel" in relu_names
    # Every kernel is [in, out].
    assert gated["encoder"]["block_0"]["layer_1"]["DenseReluDense"]["wo"]["kernel"].shape == (128, 64)


def test_init_scales_follow_hugging_face():
    config = preset("tiny", d_model=256, d_ff=512, **SMALL)
    params = init_params(config, jax.random.PRNGKey(0))
    attn = params["encoder"]["block_0"]["layer_0"]["SelfAttention"]
    ffn = params["encoder"]["block_0"]["layer_1"]["DenseReluDense"]
    expected = {
        "q": (attn["q"]["kernel"], (256 * 16) ** -0.5),
        "k": (attn["k"]["kernel"], 256**-0.5),
        "o": (attn["o"]["kernel"], 64**-0.5),
        "wo": (ffn["wo"]["kernel"], 512**-0.5),
        "embedding": (params["shared"]["embedding"], 1.0),
    }
    for name, (value, std) in expected.items():
        assert abs(float(jnp.std(value)) / std - 1) < 0.1, name
    assert float(jnp.min(params["encoder"]["final_layer_norm"]["scale"])) == 1.0
    # Abstract init of a big model allocates nothing.
    shapes = jax.eval_shape(lambda r: init_params(preset("flan-t5-xl"), r), jax.random.PRNGKey(0))
    assert shapes["shared"]["embedding"].shape == (32128, 2048)


def jit_apply(model: T5):
    """``model.apply`` compiled: eager op-by-op dispatch would dominate the tests' time."""
    return jax.jit(model.apply, static_argnames=("deterministic",))


def _tiny_inputs(config: T5Config, batch=2, src=9, tgt=6, seed=0):
    rng = np.random.default_rng(seed)
    input_ids, attention_mask, labels, decoder_attention_mask = padded_batch(rng, batch, src, tgt, config.vocab_size)
    return dict(
        input_ids=jnp.asarray(input_ids, jnp.int32),
        attention_mask=jnp.asarray(attention_mask, jnp.int32),
        decoder_input_ids=shift_right(jnp.asarray(labels, jnp.int32)),
        labels=jnp.asarray(labels, jnp.int32),
        decoder_attention_mask=jnp.asarray(decoder_attention_mask, jnp.int32),
        example_weight=jnp.ones((batch,), jnp.float32),
    )


def test_bfloat16_compute_stays_close_to_float32():
    """bf16 compute (f32 params) vs f32: logits within 0.1 * (logit std) max abs,
    loss within 1% relative -- bf16 has an 8-bit mantissa (~0.4% per rounding)."""
    config = preset("tiny", **SMALL)
    params = init_params(config, jax.random.PRNGKey(0))
    batch = _tiny_inputs(config)
    args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"])
    logits32 = jit_apply(T5(config))({"params": params}, *args)
    logits16 = jit_apply(T5(config.replace(dtype=jnp.bfloat16)))({"params": params}, *args)
    assert logits16.dtype == jnp.bfloat16
    scale = float(jnp.std(logits32))
    assert float(jnp.max(jnp.abs(logits16.astype(jnp.float32) - logits32))) < 0.1 * scale
    loss32 = seq2seq_cross_entropy(logits32, batch["labels"], batch["decoder_attention_mask"])[0]
    loss16 = seq2seq_cross_entropy(logits16, batch["labels"], batch["decoder_attention_mask"])[0]
    assert abs(float(loss16) / float(loss32) - 1) < 0.01
    # bfloat16 parameters too.
    config_bf16 = config.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert init_params(config_bf16, jax.random.PRNGKey(0))["shared"]["embedding"].dtype == jnp.bfloat16
    params_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)  # same weights, rounded
    loss_bf16, _ = jax.jit(lambda p: batch_loss(T5(config_bf16), {"params": p}, batch))(params_bf16)
    assert abs(float(loss_bf16) / float(loss32) - 1) < 0.02


def test_remat_gives_equal_gradients():
    config = preset("tiny", **SMALL)
    params = init_params(config, jax.random.PRNGKey(0))
    batch = _tiny_inputs(config)

    def grads(cfg):
        return jax.jit(jax.grad(lambda p: batch_loss(T5(cfg), {"params": p}, batch, jax.random.PRNGKey(3))[0]))(params)

    plain = grads(config.replace(dropout_rate=0.1))
    remat = grads(config.replace(dropout_rate=0.1, remat=True))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), plain, remat)


def test_dropout_only_when_asked():
    config = preset("tiny", dropout_rate=0.3, **SMALL)
    model = T5(config)
    apply = jit_apply(model)
    params = init_params(config, jax.random.PRNGKey(0))
    batch = _tiny_inputs(config)
    args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"])
    default = apply({"params": params}, *args)
    explicit = apply({"params": params}, *args, deterministic=True, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(default, explicit)
    noisy_a = apply({"params": params}, *args, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    noisy_a2 = apply({"params": params}, *args, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    noisy_b = apply({"params": params}, *args, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    np.testing.assert_array_equal(noisy_a, noisy_a2)
    assert not np.allclose(noisy_a, default, atol=1e-3)
    assert not np.allclose(noisy_a, noisy_b, atol=1e-3)


def _lora_for(params, rank, rng, targets=("q", "v")):
    """Random adapters (both A and B non-zero) for every target projection."""
    flat = flax.traverse_util.flatten_dict(params)
    lora = {}
    for path, value in flat.items():
        if path[-1] == "kernel" and path[-2] in targets:
            rng, ka, kb = jax.random.split(rng, 3)
            lora[path[:-1] + ("lora_A",)] = 0.1 * jax.random.normal(ka, (value.shape[0], rank))
            lora[path[:-1] + ("lora_B",)] = 0.1 * jax.random.normal(kb, (rank, value.shape[1]))
    return flax.traverse_util.unflatten_dict(lora)


def test_lora_collection_adds_scaled_low_rank_update():
    config = preset("tiny", **SMALL)
    lora_config = LoraConfig(rank=4, alpha=8.0, dropout=0.5, target_modules=("q", "v", "wo"))
    params = init_params(config, jax.random.PRNGKey(0))
    variables = T5(config, lora=lora_config).init(jax.random.PRNGKey(0), *[jnp.zeros((1, 1), jnp.int32)] * 4)
    assert set(variables) == {"params"}  # init never creates adapters
    lora = _lora_for(params, 4, jax.random.PRNGKey(5), targets=lora_config.target_modules)
    batch = _tiny_inputs(config)
    args = (batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"], batch["decoder_attention_mask"])
    lora_apply = jit_apply(T5(config, lora=lora_config))
    with_lora = lora_apply({"params": params, "lora": lora}, *args)

    # Deterministic LoRA == merged weights W + (alpha / r) A B.
    flat_params = flax.traverse_util.flatten_dict(params)
    flat_lora = flax.traverse_util.flatten_dict(lora)
    for path in list(flat_params):
        if path[:-1] + ("lora_A",) in flat_lora:
            a, b = flat_lora[path[:-1] + ("lora_A",)], flat_lora[path[:-1] + ("lora_B",)]
            flat_params[path] = flat_params[path] + (8.0 / 4) * a @ b
    base_apply = jit_apply(T5(config))
    merged = base_apply({"params": flax.traverse_util.unflatten_dict(flat_params)}, *args)
    np.testing.assert_allclose(with_lora, merged, atol=2e-4, rtol=1e-4)
    base = base_apply({"params": params}, *args)
    assert not np.allclose(with_lora, base, atol=1e-3)

    # LoRA dropout is active with deterministic=False (base dropout 0 in the tiny preset).
    noisy = lora_apply(
        {"params": params, "lora": lora}, *args, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}
    )
    assert not np.allclose(noisy, with_lora, atol=1e-4)

    # Gradients flow to the adapters.
    grads = jax.jit(jax.grad(
        lambda a: batch_loss(T5(config, lora=lora_config), {"params": params, "lora": a}, batch)[0]
    ))(lora)
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))

    with pytest.raises(ValueError, match="LoraConfig"):
        jax.eval_shape(lambda v: T5(config).apply(v, *args), {"params": params, "lora": lora})


def test_batch_loss_weights_padding_examples_out():
    config = preset("tiny", **SMALL)
    model = T5(config)
    params = init_params(config, jax.random.PRNGKey(0))
    loss_fn = jax.jit(lambda b: batch_loss(model, {"params": params}, b))
    batch = _tiny_inputs(config, batch=2)
    first_only = {k: v[:1] for k, v in batch.items()}
    weighted = dict(batch, example_weight=jnp.array([1.0, 0.0]))
    loss_w, tokens_w = loss_fn(weighted)
    loss_1, tokens_1 = loss_fn(first_only)
    np.testing.assert_allclose(float(loss_w), float(loss_1), rtol=1e-6)
    assert float(tokens_w) == float(tokens_1) == float(batch["decoder_attention_mask"][0].sum())
    # An all-padding example stays finite.
    empty = dict(weighted, attention_mask=weighted["attention_mask"].at[1].set(0))
    assert np.isfinite(float(loss_fn(empty)[0]))
    with pytest.raises(KeyError, match="example_weight"):
        batch_loss(model, {"params": params}, {k: v for k, v in batch.items() if k != "example_weight"})


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_gradients_match_pytorch_with_padding(tmp_path, flavour):
    """d loss / d params equals PyTorch's autograd, parameter by parameter (eval mode).

    Covers the attention core's hand-written backward pass (including the gradient of
    the position bias every block shares) as well as autodiff through the tied head.
    """
    hf_model, model, params = hf_checkpoint(tmp_path, flavour)
    input_ids, attention_mask, labels, decoder_attention_mask = padded_batch(np.random.default_rng(2))
    decoder_input_ids = np.asarray(shift_right(jnp.asarray(labels)))

    hf_model.zero_grad()
    hf_model(
        input_ids=torch.tensor(input_ids),
        attention_mask=torch.tensor(attention_mask),
        decoder_input_ids=torch.tensor(decoder_input_ids),
        decoder_attention_mask=torch.tensor(decoder_attention_mask),
        labels=torch.tensor(np.where(decoder_attention_mask > 0, labels, -100)),
    ).loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in hf_model.named_parameters() if p.grad is not None}

    def loss_fn(p):
        logits = model.apply({"params": p}, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
        return seq2seq_cross_entropy(logits, labels, decoder_attention_mask)[0]

    grads = jax.jit(jax.grad(loss_fn))(params)
    ours = models.hf_io.hf_state_dict_from_params(grads, model.config)
    assert set(ours) <= set(hf_grads) | {"lm_head.weight"}
    for name, value in ours.items():
        expected = hf_grads["shared.weight" if name == "lm_head.weight" and name not in hf_grads else name]
        np.testing.assert_allclose(value, expected, atol=2e-5, rtol=1e-4, err_msg=name)
    # The shared relative-position table gets gradient from every block of its stack.
    assert np.abs(ours["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]).max() > 0
