"""The client part of a round: local training from the server's parameters.

``make_client_update(loss_fn, optimizer)`` builds a *pure* function::

    client_update(trainable, frozen, batches, rng) -> (delta, num_examples, metrics)

run as one compiled call per client (or per vmapped group of clients). It starts
from the server's trainable parameters ``x_t``, initialises a fresh local optax
optimiser, and runs ``lax.scan`` over the ``[steps]`` axis of ``batches``::

    x^{(0)} = x_t,   s^{(0)} = opt.init(x_t)
    x^{(i+1)}, s^{(i+1)} = opt.step(∇_x loss(x^{(i)}, frozen, batch_i, fold_in(rng, i)))
    delta = x_t - x^{(steps)}

``delta`` is *server minus local*, so the weighted mean of the deltas is exactly
the pseudo-gradient ``g = x_t - mean_k x_k`` that the server optimiser consumes.
A step whose batch is entirely padding (``sum(example_weight) == 0``) leaves
parameters and optimiser state untouched, so clients with less data than the
static ``[steps, batch]`` shape train on exactly their own examples.

``num_examples`` = Σ example_weight over all steps (examples processed, FedAvg's
weight ``n_k``); for packed rows (segment ids present) each row counts its segments,
Σ_rows w · (number of segments in the row). Metrics (device arrays, no host round-trip): ``loss`` (mean over
active steps), ``tokens`` (Σ (attention_mask + decoder_attention_mask) · weight, when
those keys exist) and ``steps`` (active steps).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import chex
import jax
import jax.numpy as jnp
import optax

Params = Any
Batch = dict[str, jax.Array]
LossFn = Callable[[Params, Params, Batch, jax.Array], tuple[jax.Array, Any]]
ClientMetrics = dict[str, jax.Array]


class ClientUpdate(Protocol):
    def __call__(
        self, trainable: Params, frozen: Params, batches: Batch, rng: jax.Array
    ) -> tuple[Params, jax.Array, ClientMetrics]: ...


def batch_counts(batches: Batch) -> tuple[jax.Array, jax.Array]:
    """``(num_examples, tokens)`` of a client's stacked ``[steps, B, ...]`` batches.

    tokens = Σ attention_mask·w + Σ decoder_attention_mask·w (the project's TPS
    definition; the masks mark real tokens, packed or not); keys that are absent
    contribute nothing.

    num_examples = Σ w for one example per row; for packed rows (``decoder_segment_ids``
    present) Σ_rows w · max_t decoder_segment_ids[row, t], the number of examples packed
    in the row (segment ids run 1..k contiguously; a padding row has none).
    """
    weight = batches["example_weight"].astype(jnp.float32)
    tokens = jnp.zeros([], jnp.float32)
    for key in ("attention_mask", "decoder_attention_mask"):
        if key in batches:
            tokens = tokens + jnp.sum(batches[key].astype(jnp.float32) * weight[..., None])
    if "decoder_segment_ids" in batches:
        segments = jnp.max(batches["decoder_segment_ids"], axis=-1).astype(jnp.float32)
        chex.assert_equal_shape([segments, weight])
        return jnp.sum(weight * segments), tokens
    return jnp.sum(weight), tokens


def client_optimizer(name: str = "adamw", **kwargs: Any) -> optax.GradientTransformation:
    """A local optimiser by optax name, e.g. ``client_optimizer("adamw", learning_rate=5e-4)``.

    Any optax optimiser factory works (``adamw``, ``adam``, ``sgd``, ...).
    """
    factory = getattr(optax, name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"unknown client optimiser {name!r}: optax has no optimiser of that name")
    return factory(**kwargs)


def make_client_update(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    counts_fn: Callable[[Batch], tuple[jax.Array, jax.Array]] = batch_counts,
) -> ClientUpdate:
    """Builds the pure local-training function described in the module docstring.

    Args:
      loss_fn: ``loss_fn(trainable, frozen, batch, rng) -> (scalar loss, aux)``;
        differentiated with respect to ``trainable`` only.
      optimizer: the local optax optimiser, re-initialised every round.
      counts_fn: ``batches -> (num_examples, tokens)``.
    """

    def client_update(trainable: Params, frozen: Params, batches: Batch, rng: jax.Array):
        if "example_weight" not in batches:
            raise KeyError("client_update: batches lack 'example_weight' (see docs/architecture.md, Batches)")
        weight = batches["example_weight"]
        chex.assert_rank(weight, 2)  # [steps, B]
        chex.assert_type(weight, float)
        num_steps = weight.shape[0]
        chex.assert_tree_shape_prefix(batches, (num_steps,))
        if not jax.tree.leaves(trainable):
            raise ValueError("client_update: the trainable parameter tree is empty")

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def local_step(carry, inputs):
            params, opt_state = carry
            batch, index = inputs
            (loss, _), grads = grad_fn(params, frozen, batch, jax.random.fold_in(rng, index))
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            active = jnp.sum(batch["example_weight"]) > 0
            keep = lambda new, old: jnp.where(active, new, old)  # noqa: E731 - skip all-padding steps
            carry = (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt_state, opt_state))
            return carry, (loss.astype(jnp.float32), active)

        init = (trainable, optimizer.init(trainable))
        (local, _), (losses, active) = jax.lax.scan(local_step, init, (batches, jnp.arange(num_steps)))
        delta = jax.tree.map(lambda x0, x1: x0 - x1, trainable, local)
        chex.assert_trees_all_equal_shapes_and_dtypes(delta, trainable)

        num_examples, tokens = counts_fn(batches)
        active_steps = jnp.sum(active.astype(jnp.int32))
        mean_loss = jnp.sum(jnp.where(active, losses, 0.0)) / jnp.maximum(active_steps, 1)
        metrics = {"loss": mean_loss, "tokens": tokens, "steps": active_steps}
        return delta, num_examples, metrics

    return client_update
