"""Sequence-to-sequence training loss for T5: masked token-level cross-entropy.

For logits ``z`` [B, T, V], labels ``y`` [B, T] and a mask ``m`` [B, T] (float):

    nll[b, t] = logsumexp(z[b, t, :]) - z[b, t, y[b, t]]
    loss      = sum(m * nll) / max(sum(m), 1)

i.e. the mean over real label tokens, which equals Hugging Face's
``CrossEntropyLoss(ignore_index=-100)`` with labels set to -100 where ``m = 0``.
Computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from typing import Any, Mapping

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels", "decoder_attention_mask", "example_weight")


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


def batch_loss(
    model: nn.Module,
    variables: Mapping[str, Any],
    batch: Mapping[str, Array],
    dropout_rng: Array | None = None,
) -> tuple[Array, Array]:
    """Training loss of ``model`` on a batch in the ``docs/architecture.md`` format.

    ``variables`` is ``{"params": ...}`` (plus ``"lora"`` for adapters). Dropout is on
    when ``dropout_rng`` is given. Mask = ``decoder_attention_mask * example_weight[:, None]``.
    Returns ``(mean_loss, num_tokens)`` as :func:`seq2seq_cross_entropy`.
    """
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing key(s) {missing}; expected {list(BATCH_KEYS)}")
    deterministic = dropout_rng is None
    logits = model.apply(
        variables,
        batch["input_ids"],
        batch["attention_mask"],
        batch["decoder_input_ids"],
        batch["decoder_attention_mask"],
        deterministic=deterministic,
        rngs=None if deterministic else {"dropout": dropout_rng},
    )
    mask = batch["decoder_attention_mask"].astype(jnp.float32) * batch["example_weight"].astype(jnp.float32)[:, None]
    return seq2seq_cross_entropy(logits, batch["labels"], mask)
