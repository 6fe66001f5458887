"""Greedy generation against Hugging Face's PyTorch ``generate`` on the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from fedjax_fm import models
from fedjax_fm.models.generate import _greedy, generate

TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False)
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny untied T5 whose EOS logit is boosted so rows stop at different steps."""
    torch.manual_seed(1)
    hf_model = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY, decoder_start_token_id=0))
    head = torch.randn_like(hf_model.shared.weight)
    head[1] *= 1.8  # EOS (id 1) wins for some decoder states, not others (stops at steps 2 and 8).
    hf_model.lm_head.weight = torch.nn.Parameter(head)
    hf_model.eval()
    path = tmp_path_factory.mktemp("tiny_t5")
    hf_model.save_pretrained(path)
    model, params = models.from_pretrained(path)
    return hf_model, model, params


def _batch():
    rng = np.random.default_rng(0)
    lengths = np.array([10, 6, 3, 8])
    input_ids = rng.integers(2, TINY["vocab_size"], size=(4, 10))
    attention_mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int64)
    return input_ids * attention_mask, attention_mask


def test_greedy_matches_pytorch_generate(checkpoint):
    hf_model, model, params = checkpoint
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        hf_out = hf_model.generate(
            input_ids=torch.tensor(input_ids),
            attention_mask=torch.tensor(attention_mask),
            do_sample=False,
            num_beams=1,
            max_new_tokens=MAX_NEW_TOKENS,
        ).numpy()[:, 1:]  # drop the decoder start token
    expected = np.full((4, MAX_NEW_TOKENS), TINY.get("pad_token_id", 0))
    expected[:, : hf_out.shape[1]] = hf_out

    ours = np.asarray(generate(model, {"params": params}, input_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS))
    assert ours.shape == (4, MAX_NEW_TOKENS)
    np.testing.assert_array_equal(ours, expected)
    # The batch exercises EOS handling: rows stop at different steps, one runs to the end.
    stops = [int(np.argmax(row == 1)) if (row == 1).any() else None for row in ours]
    finished = [s for s in stops if s is not None]
    assert len(set(finished)) >= 2 and None in stops, stops
    for row, stop in zip(ours, stops):
        if stop is not None:
            assert (row[stop + 1 :] == 0).all()


def test_generate_compiles_once_and_accepts_lora(checkpoint):
    _, model, params = checkpoint
    input_ids, attention_mask = _batch()
    first = generate(model, {"params": params}, input_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS)
    compiled = _greedy._cache_size()
    other_inputs = (input_ids + 1) % TINY["vocab_size"]
    generate(model, {"params": params}, other_inputs, attention_mask, max_new_tokens=MAX_NEW_TOKENS)
    generate(type(model)(model.config), {"params": params}, input_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS)
    assert _greedy._cache_size() == compiled

    # Zero-initialised LoRA B leaves the function unchanged; the "lora" collection flows through.
    lora_config = models.LoraConfig(rank=2, alpha=4.0, target_modules=("q", "v"))
    lora_model = type(model)(model.config, lora=lora_config)
    adapters = {}
    for stack in ("encoder", "decoder"):
        adapters[stack] = {}
        for name, block in params[stack].items():
            if not name.startswith("block_"):
                continue
            attn = block["layer_0"]["SelfAttention"]
            adapters[stack][name] = {"layer_0": {"SelfAttention": {
                proj: {"lora_A": jnp.ones((attn[proj]["kernel"].shape[0], 2)),
                       "lora_B": jnp.zeros((2, attn[proj]["kernel"].shape[1]))}
                for proj in ("q", "v")
            }}}
    with_lora = generate(lora_model, {"params": params, "lora": adapters}, input_ids, attention_mask,
                         max_new_tokens=MAX_NEW_TOKENS)
    np.testing.assert_array_equal(np.asarray(with_lora), np.asarray(first))

    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="num_beams must be a positive integer"):
            generate(model, {"params": params}, input_ids, attention_mask, max_new_tokens=4, num_beams=bad)
    with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
        generate(model, {"params": params}, input_ids, attention_mask, max_new_tokens=4, num_beams=2,
                 early_stopping="always")


def test_cached_decoding_matches_teacher_forcing(checkpoint):
    """decode_step with the cache gives the same logits as the full decoder pass."""
    _, model, params = checkpoint
    input_ids, attention_mask = _batch()
    tokens = jnp.asarray(np.random.default_rng(1).integers(2, TINY["vocab_size"], size=(4, 5)), jnp.int32)
    variables = {"params": params}
    encoded = model.apply(variables, input_ids, attention_mask, method=type(model).encode)
    full = model.apply(variables, tokens, encoded, attention_mask, method=type(model).decode)
    cache = model.apply(variables, encoded, 5, method=type(model).init_cache)
    step = jax.jit(lambda tok, c, i: model.apply(variables, tok, c, i, attention_mask, method=type(model).decode_step))
    for i in range(5):
        logits, cache = step(tokens[:, i], cache, jnp.asarray(i))
        np.testing.assert_allclose(logits, full[:, i], atol=1e-4, rtol=1e-5)


def _up_to_eos(rows: np.ndarray, length: int, eos: int = 1, pad: int = 0) -> np.ndarray:
    """Each row cut after its first EOS and padded to ``length`` (transformers fills the
    tail of a beam-search row with EOS when ``pad_token_id`` is 0; we pad)."""
    out = np.full((rows.shape[0], length), pad)
    for i, row in enumerate(rows):
        stop = int(np.argmax(row == eos)) + 1 if (row == eos).any() else len(row)
        out[i, :stop] = row[:stop]
    return out


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", [
    (3, 1.0, False),     # transformers' defaults
    (4, 2.0, "never"),   # the bound on running beams uses max_new_tokens
    (2, 0.0, True),      # stop once every row has num_beams finished hypotheses
    (4, -1.0, False),    # favours short hypotheses: rows end in EOS at different steps
])
def test_beam_search_matches_pytorch_generate(checkpoint, num_beams, length_penalty, early_stopping):
    hf_model, model, params = checkpoint
    input_ids, attention_mask = _batch()
    with torch.no_grad():
        hf_out = hf_model.generate(
            input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask), do_sample=False,
            num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
            max_new_tokens=MAX_NEW_TOKENS,
        ).numpy()[:, 1:]  # drop the decoder start token
    expected = _up_to_eos(hf_out, MAX_NEW_TOKENS)
    ours = np.asarray(generate(model, {"params": params}, input_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS,
                               num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping))
    assert ours.shape == (4, MAX_NEW_TOKENS)
    np.testing.assert_array_equal(ours, expected)
    # Not vacuous: beam search finds other sequences than greedy on this model.
    greedy = np.asarray(generate(model, {"params": params}, input_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS))
    assert (ours != greedy).any()
