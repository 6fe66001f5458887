"""Glue between the generic federated core and the Flax T5: loss and variable partition.

The core only needs ``loss_fn(trainable, frozen, batch, rng) -> (loss, aux)``.
For T5 the variables are ``{"params": base}`` (+ ``{"lora": adapters}``); the loss
is :func:`fedjax_fm.models.loss.batch_loss` (token cross-entropy, mask =
``decoder_attention_mask · example_weight``), with dropout driven by ``rng``.
Packed batches (segment ids, ``fedjax_fm.data.packing``) need nothing extra here:
``batch_loss`` passes the segment ids to the model and ``fl.batch_counts`` counts
their segments.
"""

from __future__ import annotations

from typing import Any

import jax

from fedjax_fm.fl.client import LossFn
from fedjax_fm.fl.variables import join_variables, split_variables, trainable_collections
from fedjax_fm.models.config import LoraConfig
from fedjax_fm.models.lora import init_lora
from fedjax_fm.models.loss import batch_loss


def t5_loss_fn(model: Any, *, dropout: bool = True) -> LossFn:
    """``loss_fn`` for a Flax ``T5`` module (built with ``lora=`` when training adapters).

    ``dropout=False`` evaluates deterministically (the ``rng`` is then unused).
    Aux: ``{"num_tokens": Σ mask}``.
    """

    def loss_fn(trainable, frozen, batch, rng):
        variables = join_variables(trainable, frozen)
        loss, num_tokens = batch_loss(model, variables, batch, rng if dropout else None)
        return loss, {"num_tokens": num_tokens}

    return loss_fn


def t5_partition(
    params: Any, lora_config: LoraConfig | None = None, rng: jax.Array | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(trainable, frozen)`` for a T5 params tree.

    Full fine-tuning (``lora_config=None``): ``({"params": params}, {})``.
    LoRA: ``({"lora": init_lora(params, lora_config, rng)}, {"params": params})`` --
    only the adapters are trained and communicated.
    """
    if lora_config is None:
        return split_variables({"params": params}, trainable_collections(lora=False))
    if rng is None:
        raise ValueError("t5_partition: LoRA needs an rng for the adapters' A matrices")
    variables = {"params": params, "lora": init_lora(params, lora_config, rng)}
    return split_variables(variables, trainable_collections(lora=True))
