"""Greedy decoding and beam search for T5, compiled once per (model, shapes, settings).

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

Beam search (``num_beams=k > 1``) is Hugging Face's vectorised ``_beam_search``
(transformers 5), with every shape static so that it too is one ``lax.while_loop``.
Per step, with ``s_j`` the running score (summed log-probabilities) of beam ``j``:

    candidates  = top-2k over (j, v) of  s_j + log softmax(decoder(y_j))[v]
    hits        = candidate ends in EOS, or reaches max_new_tokens
    running     = top-k of the candidates that do not hit (the next step's beams;
                  the self-attention cache is reordered to follow them)
    finished    = top-k of (finished so far) and (those of the FIRST k candidates that hit,
                  scored  score / length ** length_penalty)

and the loop stops when every row's best running beam can no longer beat its worst
finished one (``early_stopping=False``: bound with the current length; ``"never"``:
with ``max_new_tokens`` when ``length_penalty > 0``), when every row has k finished
beams (``early_stopping=True``), or at ``max_new_tokens``. The result is each row's
best finished beam.
"""

from __future__ import annotations

import functools
from typing import Any, Literal, Mapping, Union

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


# Hugging Face's stand-in for minus infinity in beam scores (kept for identical ties).
_NEG = -1.0e9

EarlyStopping = Union[bool, Literal["never"]]


def _gather_beams(x: Array, indices: Array) -> Array:
    """``x[b, indices[b, j], ...]``: x [B, n, ...], indices [B, m] -> [B, m, ...]."""
    return jax.vmap(lambda row, idx: row[idx])(x, indices)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "num_beams", "length_penalty", "early_stopping")
)
def _beam_search(
    model: T5,
    variables: Mapping[str, Any],
    input_ids: Array,
    attention_mask: Array,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    early_stopping: EarlyStopping,
) -> Array:
    config = model.config
    batch, k, steps = input_ids.shape[0], num_beams, max_new_tokens
    keep = 2 * k  # candidates kept per step: max(2, 1 + number of EOS ids) * k, one EOS id
    encoded = model.apply(variables, input_ids, attention_mask, method=T5.encode)
    # Beams of a row are adjacent (row-major [B, k]), as Hugging Face's repeat_interleave.
    encoded = jnp.repeat(encoded, k, axis=0)
    beam_mask = jnp.repeat(attention_mask, k, axis=0)
    cache = model.apply(variables, encoded, steps, method=T5.init_cache)
    is_top_k = jnp.arange(keep) < k

    def cond(state: dict) -> Array:
        return state["unfinished"] & (state["step"] < steps)

    def body(state: dict) -> dict:
        step = state["step"]
        logits, cache = model.apply(variables, state["last"], state["cache"], step, beam_mask,
                                    method=T5.decode_step)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        vocab = log_probs.shape[-1]
        totals = log_probs.reshape(batch, k, vocab) + state["running_scores"][:, :, None]
        top_scores, top_index = jax.lax.top_k(totals.reshape(batch, k * vocab), keep)
        source_beam, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        top_seqs = _gather_beams(state["running_seqs"], source_beam).at[:, :, step].set(token)
        hits = (token == config.eos_token_id) | (step + 1 >= steps)

        # The next step's beams: the best k candidates that did not finish.
        running_candidates = top_scores + hits.astype(jnp.float32) * _NEG
        next_index = jax.lax.top_k(running_candidates, k)[1]
        running_seqs = _gather_beams(top_seqs, next_index)
        running_scores = _gather_beams(running_candidates, next_index)
        parent = _gather_beams(source_beam, next_index) + (jnp.arange(batch) * k)[:, None]

        # Finished hypotheses: only the first k candidates may enter, length-normalised.
        just_finished = hits & is_top_k[None, :]
        finished_scores = top_scores / ((step + 1).astype(jnp.float32) ** length_penalty)
        if early_stopping is True:
            full = jnp.all(state["is_finished"], axis=-1, keepdims=True)
            finished_scores = finished_scores + full.astype(jnp.float32) * _NEG
        finished_scores = finished_scores + (~state["improvable"]).astype(jnp.float32) * _NEG
        finished_scores = finished_scores + (~just_finished).astype(jnp.float32) * _NEG
        merged_scores = jnp.concatenate([state["scores"], finished_scores], axis=1)
        best = jax.lax.top_k(merged_scores, k)[1]
        seqs = _gather_beams(jnp.concatenate([state["seqs"], top_seqs], axis=1), best)
        scores = _gather_beams(merged_scores, best)
        is_finished = _gather_beams(jnp.concatenate([state["is_finished"], just_finished], axis=1), best)

        # Follow the surviving beams: reorder the self-attention cache (the cross-attention
        # keys/values are the same for every beam of a row).
        flat_parent = parent.reshape(-1)
        cache = [dict(c, k=c["k"][flat_parent], v=c["v"][flat_parent]) for c in cache]

        length = step + 1  # generated tokens after this step
        if early_stopping == "never" and length_penalty > 0.0:
            bound_length = jnp.asarray(steps, jnp.float32)
        else:
            bound_length = length.astype(jnp.float32)
        best_possible = running_scores[:, :1] / bound_length**length_penalty
        worst_finished = jnp.where(is_finished, jnp.min(scores, axis=1, keepdims=True), _NEG)
        improvable = state["improvable"] & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        unfinished = jnp.any(improvable) & ~jnp.all(hits)
        if early_stopping is True:
            unfinished = unfinished & ~jnp.all(is_finished)
        return dict(
            step=length, last=running_seqs[:, :, step].reshape(-1), cache=cache,
            running_seqs=running_seqs, running_scores=running_scores,
            seqs=seqs, scores=scores, is_finished=is_finished, improvable=improvable, unfinished=unfinished,
        )

    pad_seqs = jnp.full((batch, k, steps), config.pad_token_id, jnp.int32)
    state = dict(
        step=jnp.asarray(0, jnp.int32),
        last=jnp.full((batch * k,), config.decoder_start_token_id, jnp.int32),
        cache=cache,
        running_seqs=pad_seqs,
        # Only beam 0 is live at the start, so the first step's k candidates differ.
        running_scores=jnp.where(jnp.arange(k) == 0, 0.0, _NEG)[None, :].repeat(batch, 0).astype(jnp.float32),
        seqs=pad_seqs,
        scores=jnp.full((batch, k), _NEG, jnp.float32),
        is_finished=jnp.zeros((batch, k), bool),
        improvable=jnp.ones((batch, 1), bool),
        unfinished=jnp.asarray(True),
    )
    return jax.lax.while_loop(cond, body, state)["seqs"][:, 0]


def generate(
    model: T5,
    variables: Mapping[str, Any],
    input_ids: Array,
    attention_mask: Array | None = None,
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: EarlyStopping = False,
) -> Array:
    """Greedy (``num_beams=1``) or beam-search generation: token ids [batch, max_new_tokens],
    padded with ``pad_token_id`` after each row's EOS (and after the last step if every
    row finished early).

    ``variables`` is ``{"params": ...}``, plus ``"lora"`` for a model built with a
    ``LoraConfig``. Equal, token for token, to transformers'
    ``generate(do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
    length_penalty=..., early_stopping=...)`` on the same weights, without the leading
    decoder start token. ``length_penalty`` and ``early_stopping`` only apply to beam
    search (see the module docstring); beam search runs the decoder on
    ``batch * num_beams`` rows.
    """
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if early_stopping != "never":
        early_stopping = bool(early_stopping)  # a static jit argument: 1 and True alike
    chex.assert_rank(input_ids, 2)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    chex.assert_equal_shape([input_ids, attention_mask])
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if num_beams == 1:
        return _greedy(model, variables, input_ids, attention_mask, max_new_tokens)
    return _beam_search(model, variables, input_ids, attention_mask, max_new_tokens, num_beams,
                        float(length_penalty), early_stopping)
