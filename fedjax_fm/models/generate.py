"""Greedy decoding for T5, compiled once per (model, shapes, max_new_tokens).

Algorithm (Hugging Face's ``generate(do_sample=False, num_beams=1)``):

    h      = encode(x)                                  # once
    y_prev = decoder_start_token_id
    for t in 0 .. max_new_tokens-1 (stopping early once every row has finished):
        y_t = argmax_v decoder(y_prev | cache, h)[v]    # one position, key/value cache
        y_t = pad_token_id if the row already emitted EOS
        y_prev = y_t

The loop is a ``lax.while_loop`` over a preallocated cache of static length
``max_new_tokens`` (self-attention keys/values per decoder block; the encoder's
cross-attention keys/values are projected once). The jit cache is keyed on the model
(a hashable Flax module), ``max_new_tokens`` and the input shapes, so evaluation every
few rounds reuses one compiled function.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp

from fedjax_fm.models.t5 import T5

Array = jax.Array


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _greedy(
    model: T5, variables: Mapping[str, Any], input_ids: Array, attention_mask: Array, max_new_tokens: int
) -> Array:
    config = model.config
    batch = input_ids.shape[0]
    encoded = model.apply(variables, input_ids, attention_mask, method=T5.encode)
    cache = model.apply(variables, encoded, max_new_tokens, method=T5.init_cache)

    def cond(state: tuple) -> Array:
        step, _, finished, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(finished)

    def body(state: tuple) -> tuple:
        step, previous, finished, tokens, cache = state
        logits, cache = model.apply(variables, previous, cache, step, attention_mask, method=T5.decode_step)
        next_token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        next_token = jnp.where(finished, config.pad_token_id, next_token)
        tokens = jax.lax.dynamic_update_slice(tokens, next_token[:, None], (0, step))
        finished = finished | (next_token == config.eos_token_id)
        return step + 1, next_token, finished, tokens, cache

    state = (
        jnp.asarray(0, jnp.int32),
        jnp.full((batch,), config.decoder_start_token_id, jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.full((batch, max_new_tokens), config.pad_token_id, jnp.int32),
        cache,
    )
    return jax.lax.while_loop(cond, body, state)[3]


def generate(
    model: T5,
    variables: Mapping[str, Any],
    input_ids: Array,
    attention_mask: Array | None = None,
    *,
    max_new_tokens: int,
    num_beams: int = 1,
) -> Array:
    """Greedy generation: token ids [batch, max_new_tokens], padded with ``pad_token_id``
    after each row's EOS (and after the last step if every row finished early).

    ``variables`` is ``{"params": ...}``, plus ``"lora"`` for a model built with a
    ``LoraConfig``. Only ``num_beams=1`` (greedy) is implemented.
    """
    if num_beams != 1:
        raise ValueError(f"num_beams={num_beams}: only greedy decoding (num_beams=1) is implemented")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    chex.assert_rank(input_ids, 2)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    chex.assert_equal_shape([input_ids, attention_mask])
    return _greedy(model, variables, input_ids, jnp.asarray(attention_mask, jnp.int32), max_new_tokens)
