"""DP-FedAvg aggregation: per-client clipping, Gaussian noise, adaptive clipping.

The mechanism is DP-FedAvg with a fixed denominator (McMahan, Ramage, Talwar,
Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018,
Algorithm 1 with the estimator ``f̃_f``). In round ``t`` with clip norm ``C``,
noise multiplier ``z_Δ`` and the *expected* number of clients per round ``K``::

    valid_k  = (every entry of delta_k is finite) ∧ n_k > 0
    clip_k   = valid_k · delta_k · min(1, C / ‖delta_k‖₂)          ‖clip_k‖₂ ≤ C
    g        = (Σ_k clip_k + N(0, (z_Δ C)² I)) / K

Why these choices (each is what the accountant's theorem needs):

* **Uniform weights.** A client's influence on the sum is its clipped delta,
  at most ``C`` in L2 whatever its data. Example weights ``n_k`` would make it
  depend on ``n_k`` (unbounded, and itself private), so DP is uniform-only
  (:func:`fedjax_fm.fl.accountant.validate_dp_config` refuses the other).
* **Fixed denominator K.** Dividing by the *realised* number of valid clients
  would make the divisor data-dependent (adding or removing one client changes
  it), so the sensitivity of the mean would no longer be ``C/K``. With the
  constant expected ``K`` (Poisson: ``K = q·N``; fixed-size: ``K`` itself) the
  released ``g`` is the Gaussian mechanism on the sum (sensitivity ``C`` under
  add/remove-one, ``2C`` under replace-one) post-processed by ``1/K``; the noise
  on ``g`` has standard deviation ``z_Δ·C/K`` and one client moves ``g`` by at
  most ``C/K``. The price is a biased mean when fewer than ``K`` clients show up.
* **Rejected clients contribute zero.** A client whose delta has a NaN/Inf is
  replaced by the zero vector (norm 0 ≤ C), as are padded slots and clients with
  ``n_k = 0``. Whether a client is rejected depends on that client's own data
  only, so "clip, or zero if non-finite" is still a per-client map into the
  C-ball and the guarantee is unchanged. What is *not* covered: the diagnostic
  counts in the result (``num_valid``, ``num_nonfinite``, ``valid``) and any
  per-client metric (loss, tokens) — they are exact, un-noised, and must not be
  published as part of the private release.
* **Always applied.** A round is applied even with zero valid clients (it then
  releases pure noise). Skipping a round when too few clients were valid would be
  an un-noised, data-dependent decision, so ``min_clients`` does not apply here.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private
Learning with Adaptive Clipping", NeurIPS 2021, Algorithm 1): ``C`` is server
state, moved geometrically towards the ``γ``-quantile of the client update norms
from a noisy count::

    b_k  = valid_k · (1[‖delta_k‖₂ ≤ C] − ½)          centred: |b_k| ≤ ½
    b̄   = (Σ_k b_k + N(0, σ_b²)) / K + ½               noisy fraction with norm ≤ C
    C'   = C · exp(−η_C (b̄ − γ))

Centring halves the count's sensitivity (½ instead of 1). Releasing the update sum
(multiplier ``z_Δ``) and the count (sensitivity ½, noise σ_b: multiplier ``2σ_b``)
together is one Gaussian mechanism with multiplier ``z`` where
``z⁻² = z_Δ⁻² + (2σ_b)⁻²``. So for a privacy level ``z`` (what the accountant is
told) the update noise must use the larger

    z_Δ = (z⁻² − (2σ_b)⁻²)^(−½)          (requires 2σ_b > z)

(:func:`update_noise_multiplier`). Under replace-one both sensitivities double and
the identity still holds with ``z/2``; see ``fl/accountant.py``.

State: the aggregator signature ``(deltas, num_examples, rng) -> AggregateResult``
has no state. Fixed clipping needs none: :func:`make_dp_aggregator` returns a plain
aggregator for :class:`~fedjax_fm.fl.FederatedAlgorithm`. Adaptive clipping is an
optax-style pair :class:`DPAggregator` ``(init, update)`` whose state
:class:`DPClipState` is a one-scalar pytree the server state can hold (next to
``params`` and ``opt_state``); ``update`` is pure and returns the new state, and
:class:`DPAggregateResult` also carries ``next_clip_norm`` for the record.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from fedjax_fm.fl.aggregation import client_is_finite

Params = Any


class AdaptiveClipping(NamedTuple):
    """Andrew et al. 2021 settings: target quantile ``γ``, learning rate ``η_C``, count noise ``σ_b``."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float = 1.0


class DPClipState(NamedTuple):
    """The server-side state of DP aggregation: the clip norm ``C`` (float32 ``[]``)."""

    clip_norm: jax.Array


class DPAggregateResult(NamedTuple):
    """:class:`~fedjax_fm.fl.AggregateResult`'s fields (same names, same meaning) plus DP ones.

    ``num_valid``, ``num_nonfinite`` and ``valid`` are exact diagnostics, outside the
    DP guarantee. ``applied`` is always true (see the module docstring).
    """

    pseudo_gradient: Any
    num_valid: jax.Array
    num_nonfinite: jax.Array
    valid: jax.Array
    applied: jax.Array
    clip_norm: jax.Array  # float32 []: the C used this round
    next_clip_norm: jax.Array  # float32 []: C for the next round (== clip_norm without adaptive clipping)
    noise_stddev: jax.Array  # float32 []: std of the noise on g, z_Δ·C/K
    noisy_quantile: jax.Array  # float32 []: b̄, the noisy fraction of clients with norm ≤ C (NaN without adaptive)


class DPAggregator(NamedTuple):
    """A stateful DP aggregator as a pure ``(init, update)`` pair (optax style).

    ``init() -> DPClipState``;
    ``update(deltas, num_examples, rng, state) -> (DPAggregateResult, DPClipState)``.
    """

    init: Callable[[], DPClipState]
    update: Callable[[Params, jax.Array, jax.Array, DPClipState], tuple[DPAggregateResult, DPClipState]]


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """``z_Δ = (z⁻² − (2σ_b)⁻²)^(−½)``: the update noise that, together with the
    clipped count's noise ``σ_b``, gives the overall multiplier ``z`` (Andrew et al. 2021, §3.1)."""
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if 2.0 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"count_stddev σ_b={count_stddev} must exceed noise_multiplier/2={noise_multiplier / 2}: "
            "otherwise the count alone would spend more than the whole privacy budget"
        )
    return (noise_multiplier**-2 - (2.0 * count_stddev) ** -2) ** -0.5


def effective_noise_multiplier(update_multiplier: float, count_stddev: float) -> float:
    """The inverse: ``z = (z_Δ⁻² + (2σ_b)⁻²)^(−½)``, the multiplier the accountant sees."""
    if update_multiplier <= 0 or count_stddev <= 0:
        raise ValueError("update_multiplier and count_stddev must be > 0")
    return (update_multiplier**-2 + (2.0 * count_stddev) ** -2) ** -0.5


def client_norms(deltas: Params) -> jax.Array:
    """``[clients]`` float32 global L2 norm of each client's delta (all leaves together)."""
    leaves = jax.tree.leaves(deltas)
    num_clients = leaves[0].shape[0]
    squares = [jnp.sum(jnp.square(leaf.astype(jnp.float32)).reshape(num_clients, -1), axis=1) for leaf in leaves]
    return jnp.sqrt(jnp.sum(jnp.stack(squares, axis=0), axis=0))


def clip_deltas(deltas: Params, clip_norm: jax.Array, keep: jax.Array | None = None) -> tuple[Params, jax.Array]:
    """Each client's delta scaled to L2 norm ``≤ clip_norm``; clients with ``keep`` false become zero.

    Returns ``(clipped, norms)`` where ``norms`` are the pre-clipping norms (of the
    zeroed delta for dropped clients, i.e. 0). Non-finite entries of dropped clients
    are replaced, not multiplied (``NaN · 0`` is still NaN).
    """
    leaves = jax.tree.leaves(deltas)
    num_clients = leaves[0].shape[0]
    if keep is None:
        keep = jnp.ones([num_clients], bool)
    chex.assert_shape(keep, (num_clients,))
    chex.assert_tree_shape_prefix(deltas, (num_clients,))

    def mask(leaf: jax.Array) -> jax.Array:
        return jnp.where(keep.reshape((num_clients,) + (1,) * (leaf.ndim - 1)), leaf, jnp.zeros_like(leaf))

    safe = jax.tree.map(mask, deltas)
    norms = client_norms(safe)
    # min(1, C/‖Δ‖) with a floor on the norm so a zero delta gives scale 1, not 0/0.
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))

    def clip(leaf: jax.Array) -> jax.Array:
        s = scale.reshape((num_clients,) + (1,) * (leaf.ndim - 1))
        return (leaf.astype(jnp.float32) * s).astype(leaf.dtype)

    return jax.tree.map(clip, safe), norms


def noisy_mean_of_sum(total: Params, update_key: jax.Array, sum_stddev: jax.Array | float,
                      expected_clients: float) -> Params:
    """``g = (Σ_k clip_k + N(0, σ² I)) / K`` leaf by leaf (float32), from the sum of the clipped updates.

    ``update_key`` is split into one key per leaf, in ``jax.tree.leaves`` order. The one
    place the Gaussian noise of DP-FedAvg is drawn: :func:`dp_aggregate` calls it on the
    sum it computes, a deployment with secure aggregation on the sum SecAgg+ reveals
    (``fedjax_fm/deploy/secure.py``), so both add the same noise for the same key.
    """
    leaves, treedef = jax.tree.flatten(total)
    keys = jax.random.split(update_key, len(leaves))

    def one(leaf: jax.Array, key: jax.Array) -> jax.Array:
        leaf = leaf.astype(jnp.float32)
        noise = sum_stddev * jax.random.normal(key, leaf.shape, jnp.float32)
        return (leaf + noise) / expected_clients

    return jax.tree.unflatten(treedef, [one(x, k) for x, k in zip(leaves, keys)])


def dp_aggregate(
    deltas: Params,
    num_examples: jax.Array,
    rng: jax.Array,
    *,
    clip_norm: jax.Array | float,
    noise_multiplier: float,
    expected_clients: float,
    adaptive: AdaptiveClipping | None = None,
) -> DPAggregateResult:
    """One round of DP-FedAvg aggregation (formulas in the module docstring). Pure, jittable.

    Args:
      deltas: pytree with a leading ``[clients]`` axis (padded slots allowed).
      num_examples: ``[clients]``; only ``n_k > 0`` matters (uniform weights), so
        padded or absent clients carry 0.
      rng: the round's server key (``fold_in(fold_in(seed_key, t), SERVER_STREAM)``).
      clip_norm: ``C`` for this round (a traced scalar under adaptive clipping).
      noise_multiplier: ``z``, the overall multiplier the accountant is told. With
        ``adaptive`` the update noise uses ``z_Δ = update_noise_multiplier(z, σ_b)``.
      expected_clients: ``K``, the fixed denominator (Poisson: ``q·N``).
      adaptive: settings for adaptive clipping, or None for a fixed ``C``.
    """
    if expected_clients <= 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    num_clients = num_examples.shape[0]
    chex.assert_rank(num_examples, 1)
    chex.assert_tree_shape_prefix(deltas, (num_clients,))
    clip_norm = jnp.asarray(clip_norm, jnp.float32)
    chex.assert_rank(clip_norm, 0)
    z_update = update_noise_multiplier(noise_multiplier, adaptive.count_stddev) if adaptive else noise_multiplier

    finite = client_is_finite(deltas)
    valid = finite & (num_examples > 0)
    clipped, norms = clip_deltas(deltas, clip_norm, keep=valid)
    update_key, count_key = jax.random.split(rng)

    sum_stddev = z_update * clip_norm
    total = jax.tree.map(lambda leaf: jnp.sum(leaf.astype(jnp.float32), axis=0), clipped)
    pseudo_gradient = jax.tree.map(lambda g, leaf: g.astype(leaf.dtype),
                                   noisy_mean_of_sum(total, update_key, sum_stddev, expected_clients), clipped)

    if adaptive is None:
        next_clip_norm = clip_norm
        noisy_quantile = jnp.asarray(jnp.nan, jnp.float32)
    else:
        centred = jnp.where(valid, (norms <= clip_norm).astype(jnp.float32) - 0.5, 0.0)
        noisy_sum = jnp.sum(centred) + adaptive.count_stddev * jax.random.normal(count_key, [], jnp.float32)
        noisy_quantile = noisy_sum / expected_clients + 0.5
        next_clip_norm = clip_norm * jnp.exp(-adaptive.learning_rate * (noisy_quantile - adaptive.target_quantile))

    return DPAggregateResult(
        pseudo_gradient=pseudo_gradient,
        num_valid=jnp.sum(valid.astype(jnp.int32)),
        num_nonfinite=jnp.sum((~finite).astype(jnp.int32)),
        valid=valid,
        applied=jnp.asarray(True),
        clip_norm=clip_norm,
        next_clip_norm=next_clip_norm,
        noise_stddev=sum_stddev / expected_clients,
        noisy_quantile=noisy_quantile,
    )


def _check_settings(clip_norm: float, noise_multiplier: float, expected_clients: float) -> None:
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be finite and > 0, got {clip_norm}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier}")
    if not expected_clients > 0:
        raise ValueError(f"expected_clients must be > 0, got {expected_clients}")


def make_dp_aggregator(
    clip_norm: float, noise_multiplier: float, expected_clients: float
) -> Callable[[Params, jax.Array, jax.Array], DPAggregateResult]:
    """DP-FedAvg with a fixed clip norm, as a plain ``aggregator(deltas, n, rng)``
    for :class:`~fedjax_fm.fl.FederatedAlgorithm` (no state to carry)."""
    _check_settings(clip_norm, noise_multiplier, expected_clients)

    def aggregator(deltas: Params, num_examples: jax.Array, rng: jax.Array) -> DPAggregateResult:
        return dp_aggregate(
            deltas,
            num_examples,
            rng,
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            expected_clients=expected_clients,
        )

    return aggregator


def dp_fedavg_aggregator(
    initial_clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    adaptive: AdaptiveClipping | None = None,
) -> DPAggregator:
    """DP-FedAvg as an ``(init, update)`` pair whose state is the clip norm.

    Without ``adaptive`` the state never changes (and :func:`make_dp_aggregator` is
    the simpler choice). ``update`` is pure: jit it, or call it inside a jitted
    server step, and store the returned :class:`DPClipState` with the server state
    (and in checkpoints: a resumed run must continue from the same ``C``).
    """
    _check_settings(initial_clip_norm, noise_multiplier, expected_clients)
    if adaptive is not None:
        if not 0.0 < adaptive.target_quantile < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {adaptive.target_quantile}")
        if not adaptive.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {adaptive.learning_rate}")
        update_noise_multiplier(noise_multiplier, adaptive.count_stddev)  # refuses 2σ_b <= z

    def init() -> DPClipState:
        return DPClipState(clip_norm=jnp.asarray(initial_clip_norm, jnp.float32))

    def update(
        deltas: Params, num_examples: jax.Array, rng: jax.Array, state: DPClipState
    ) -> tuple[DPAggregateResult, DPClipState]:
        result = dp_aggregate(
            deltas,
            num_examples,
            rng,
            clip_norm=state.clip_norm,
            noise_multiplier=noise_multiplier,
            expected_clients=expected_clients,
            adaptive=adaptive,
        )
        return result, DPClipState(clip_norm=result.next_clip_norm)

    return DPAggregator(init=init, update=update)
