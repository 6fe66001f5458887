"""Sequence-to-sequence training loss for T5: masked token-level cross-entropy.

For logits ``z`` [B, T, V], labels ``y`` [B, T] and a mask ``m`` [B, T] (float):

    nll[b, t] = logsumexp(z[b, t, :]) - z[b, t, y[b, t]]
    loss      = sum(m * nll) / max(sum(m), 1)

i.e. the mean over real label tokens, which equals Hugging Face's
``CrossEntropyLoss(ignore_index=-100)`` with labels set to -100 where ``m = 0``.
Computed in float32 whatever the logits' dtype.

Packed batches (``fedjax_fm.data.packing``) carry segment ids as well; the loss is the
same token mean over every real label token of every packed example, so a packed
batch and the same examples unpadded one per row give the same loss and gradients.
"""

from __future__ import annotations

from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels", "decoder_attention_mask", "example_weight")
# The model's extra inputs for a packed batch (several examples per row). A packed
# batch also holds positions, but the model needs none: relative positions inside a
# contiguous segment equal differences of row indices (see models/t5.py).
SEGMENT_KEYS = ("encoder_segment_ids", "decoder_segment_ids")


def seq2seq_cross_entropy(logits: Array, labels: Array, mask: Array) -> tuple[Array, Array]:
    """Masked mean token cross-entropy; returns ``(mean_loss, num_tokens)``.

    ``num_tokens = sum(mask)`` (a float32 scalar; weighted if the mask is). Masked
    positions contribute exactly zero, even if their logits are not finite.
    """
    chex.assert_rank(logits, 3)
    chex.assert_equal_shape([labels, mask])
    chex.assert_equal_shape_prefix([logits, labels], 2)
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - label_logit
    nll = jnp.where(mask > 0, nll, 0.0)
    num_tokens = jnp.sum(mask)
    return jnp.sum(nll * mask) / jnp.maximum(num_tokens, 1.0), num_tokens


def shift_right(labels: Array, decoder_start_token_id: int = 0, pad_token_id: int = 0) -> Array:
    """Decoder inputs from labels: ``[start, y_0, ..., y_{T-2}]``; -100 becomes pad (as in HF)."""
    chex.assert_rank(labels, 2)
    start = jnp.full((labels.shape[0], 1), decoder_start_token_id, dtype=labels.dtype)
    shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, jnp.asarray(pad_token_id, labels.dtype), shifted)


def shift_right_packed(
    labels: Array, segment_ids: Array, decoder_start_token_id: int = 0, pad_token_id: int = 0
) -> Array:
    """Decoder inputs of packed rows: labels shifted right *within each segment*.

    ``out[t] = start`` where a segment begins (``seg[t] != seg[t-1]``, or ``t = 0``),
    ``labels[t-1]`` inside a segment, and ``pad`` where ``seg[t] = 0``. So every packed
    example's decoder inputs equal :func:`shift_right` of its labels alone.
    """
    chex.assert_rank(labels, 2)
    chex.assert_equal_shape([labels, segment_ids])
    shifted = shift_right(labels, decoder_start_token_id, pad_token_id)
    previous = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1]), segment_ids[:, :-1]], axis=1)
    starts = segment_ids != previous
    shifted = jnp.where(starts, jnp.asarray(decoder_start_token_id, labels.dtype), shifted)
    return jnp.where(segment_ids > 0, shifted, jnp.asarray(pad_token_id, labels.dtype))


def batch_loss(
    model: nn.Module,
    variables: Mapping[str, Any],
    batch: Mapping[str, Array],
    dropout_rng: Array | None = None,
) -> tuple[Array, Array]:
    """Training loss of ``model`` on a batch in the ``docs/architecture.md`` format.

    ``variables`` is ``{"params": ...}`` (plus ``"lora"`` for adapters). Dropout is on
    when ``dropout_rng`` is given. Mask = ``decoder_attention_mask * example_weight[:, None]``.
    A packed batch (with ``encoder_segment_ids`` and ``decoder_segment_ids``) runs the
    segment-aware model; its ``example_weight`` is per row (1 = a row holding real
    examples), so the mask still marks exactly the real label tokens.
    Returns ``(mean_loss, num_tokens)`` as :func:`seq2seq_cross_entropy`.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing key(s) {missing}; expected {list(BATCH_KEYS)}")
    present = [k for k in SEGMENT_KEYS if k in batch]
    if len(present) == 1:
        raise KeyError(f"packed batch has {present[0]} but not its partner; give both of {list(SEGMENT_KEYS)}")
    segments = {k: batch[k] for k in present}  # empty for an unpacked batch: the call is unchanged
    deterministic = dropout_rng is None
    logits = model.apply(
        variables,
        batch["input_ids"],
        batch["attention_mask"],
        batch["decoder_input_ids"],
        batch["decoder_attention_mask"],
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": dropout_rng},
        **segments,
    )
    mask = batch["decoder_attention_mask"].astype(jnp.float32) * batch["example_weight"].astype(jnp.float32)[:, None]
    return seq2seq_cross_entropy(logits, batch["labels"], mask)
