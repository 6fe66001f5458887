"""Aggregation of client deltas over the client axis, with non-finite rejection.

Client ``k`` returns ``delta_k = x_t - x_k`` (server minus local parameters) and a
weight ``n_k`` (examples it trained on). With ``finite_k`` = "every entry of
``delta_k`` is finite" and ``valid_k = finite_k ∧ n_k > 0``, the aggregate is::

    w_k     = valid_k · (n_k  if weighting == "examples"  else 1)
    g       = Σ_k w_k delta_k / Σ_k w_k                  = x_t - Σ_k w_k x_k / Σ_k w_k
    applied = Σ_k valid_k ≥ min_clients

``g`` is the pseudo-gradient fed to the server optimiser. When ``applied`` is
false the round is reported but the server keeps its parameters and optimiser
state. Everything is pure and jittable: invalid clients are masked with
``where`` (a NaN times zero would still be NaN), never branched on in Python.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import chex
import jax
import jax.numpy as jnp

Weighting = Literal["examples", "uniform"]


class AggregateResult(NamedTuple):
    """Output of :func:`aggregate`."""

    pseudo_gradient: Any  # pytree like one client's delta; zeros when not applied
    num_valid: jax.Array  # int32 []: clients with finite deltas and n_k > 0
    num_nonfinite: jax.Array  # int32 []: clients rejected for NaN/Inf
    valid: jax.Array  # bool [clients]
    applied: jax.Array  # bool []: num_valid >= min_clients


def client_is_finite(deltas: Any) -> jax.Array:
    """``[clients]`` bool: whether every entry of each client's delta is finite."""
    leaves = jax.tree.leaves(deltas)
    if not leaves:
        raise ValueError("aggregate: the client deltas pytree has no leaves")
    flags = [jnp.all(jnp.isfinite(leaf).reshape(leaf.shape[0], -1), axis=1) for leaf in leaves]
    return jnp.all(jnp.stack(flags, axis=0), axis=0)


def aggregate(
    deltas: Any,
    num_examples: jax.Array,
    *,
    weighting: Weighting = "examples",
    min_clients: int = 1,
) -> AggregateResult:
    """Weighted mean over the leading client axis of ``deltas`` (see module docstring).

    Args:
      deltas: pytree whose leaves have a leading ``[clients]`` axis.
      num_examples: ``[clients]`` float32 example counts ``n_k``.
      weighting: ``"examples"`` (FedAvg's ``n_k`` weights) or ``"uniform"``.
      min_clients: fewest valid clients for the round to be applied.
    """
    if weighting not in ("examples", "uniform"):
        raise ValueError(f"weighting must be 'examples' or 'uniform', got {weighting!r}")
    num_clients = num_examples.shape[0]
    chex.assert_rank(num_examples, 1)
    chex.assert_tree_shape_prefix(deltas, (num_clients,))
    finite = client_is_finite(deltas)
    valid = finite & (num_examples > 0)
    base = num_examples.astype(jnp.float32) if weighting == "examples" else jnp.ones_like(num_examples, jnp.float32)
    weights = jnp.where(valid, base, 0.0)
    total = jnp.sum(weights)
    num_valid = jnp.sum(valid.astype(jnp.int32))
    applied = num_valid >= min_clients
    # Normalised weights; all-zero when nothing is valid (no 0/0).
    norm = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), 0.0)

    def mean(leaf: jax.Array) -> jax.Array:
        w = norm.reshape((num_clients,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)
        safe = jnp.where(valid.reshape(w.shape), leaf, jnp.zeros_like(leaf))
        out = jnp.sum(w * safe, axis=0)
        return jnp.where(applied, out, jnp.zeros_like(out))

    return AggregateResult(
        pseudo_gradient=jax.tree.map(mean, deltas),
        num_valid=num_valid,
        num_nonfinite=jnp.sum((~finite).astype(jnp.int32)),
        valid=valid,
        applied=applied,
    )
