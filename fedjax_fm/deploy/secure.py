"""Secure aggregation on the devices with Flower's SecAgg+ (``deploy.secure_aggregation``).

With ``deploy.secure_aggregation.enabled`` a round's fit phase runs Flower's SecAgg+
protocol (Bell et al. 2020): ``flwr.server.workflow.SecAggPlusWorkflow`` on the
ServerApp, ``flwr.client.mod.secaggplus_mod`` on each device's ClientApp. Each device
masks its quantised update with pairwise and private masks; the server sums the
masked vectors and removes the masks with secret shares the devices send it, so it
learns the **sum** of the quantised updates and nothing else about an individual
update (up to Flower's implementation, see ``docs/deploy.md``).

What a device puts into the sum (:func:`device_contribution`), with ``c`` =
``clipping_range``, ``Q`` = ``quantization_range``, ``W`` the SecAgg ``max_weight``::

    finite_k   = every entry of delta_k is finite ∧ n_k > 0        (else: zero vector, weight 0)
    delta_k    ← delta_k · min(1, C / ‖delta_k‖₂)                 (under DP only: clip to C on the device)
    w_k        = 1 (uniform weighting, and always under DP)  |  n_k (weighting: examples)
    a_k        = round(Q · w_k / W) / Q                           (Flower quantises the weight; W = 1 if uniform)
    z_k        = SR((clip(a_k · delta_k, −c, c) + c) · Q / 2c)   (stochastic rounding to Q levels)

and the server, after unmasking, recovers ``Σ_k z_k`` and ``Σ_k a_k`` and so
(``flwr/server/workflow/secure_aggregation/secaggplus_workflow.py``, ``unmask_stage``)::

    mean = (Σ_k z_k · 2c/Q − n·c) / Σ_k a_k  =  Σ_k a_k delta_k / Σ_k a_k  +  E,
    |E| < n · (2c/Q) / Σ_k a_k   per coordinate                    (n devices in the sum)

as long as no coordinate was cut by ``±c`` (each device reports how many it cut, in
``secagg_clipped_values``). Stochastic rounding errs by less than one level ``2c/Q``
per device and coordinate; devices hand the mod float64 arrays so that the rounding
is that of the levels, not of float32. With uniform weights ``a_k = 1`` and the bound
is ``n · (2c/Q) / n_valid``; with example weights the weights themselves are rounded
to ``1/Q`` (relative error ``≤ W / (2 Q n_k)``) and the mean is the ``a_k``-weighted one.

The server step (:func:`make_secure_server_step`, pure and compiled):

* without DP: ``g = mean`` (applied if at least ``federated.min_clients`` valid
  devices answered), then the configured server optimiser (:func:`fl.apply_pseudo_gradient`);
* with DP (central model): ``g = (mean · n_valid + N(0, (zC)² I)) / K``, the noise drawn
  by :func:`fl.noisy_mean_of_sum` with the simulation's key for the round, so the
  accountant sees exactly what it sees in simulation (clipped uniform contributions,
  Gaussian noise of ``z·C`` on their sum, fixed denominator ``K``). The error bound of
  ``g`` is ``n · (2c/Q) / K``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_fm import fl
from fedjax_fm.config import ConfigError, ExperimentConfig

# Flower's default modulus: masks and sums live in Z_{2^32}.
MODULUS_RANGE = 2**32

# metrics.jsonl fields of a deployment with secure aggregation (docs/deploy.md); null without it.
SECURE_FIELDS = ("secure_aggregation", "secagg_error_bound", "secagg_clipped_values")


@dataclasses.dataclass(frozen=True)
class SecAggPlan:
    """The resolved ``deploy.secure_aggregation`` settings of a run (see :func:`plan_secure_aggregation`)."""

    num_shares: Optional[int]  # None: every sampled device (Flower's ``num_shares=1.0``)
    reconstruction_threshold: int
    clipping_range: float
    quantization_range: int
    max_weight: float  # what Flower divides weights by: 1.0 under uniform weights
    weighting: str  # "uniform" or "examples"
    dp_clip_norm: Optional[float]  # C: devices clip their update to it (DP only)

    @property
    def level(self) -> float:
        """One quantisation level ``2c/Q``: a device's rounding error per coordinate is below it."""
        return 2.0 * self.clipping_range / self.quantization_range

    def weight(self, num_examples: float) -> int:
        """``w_k``, the integer weight a device reports as ``FitRes.num_examples`` (the mod multiplies by it)."""
        if num_examples <= 0:
            return 0
        return 1 if self.weighting == "uniform" else int(round(num_examples))

    def quantized_weight(self, weight: float) -> float:
        """``a_k = round(Q · w_k / W) / Q``: the weight as Flower's ``secaggplus_mod`` applies it."""
        return round(weight / self.max_weight * self.quantization_range) / self.quantization_range

    def error_bound(self, num_summed: int, weight_sum: float, expected_clients: Optional[float] = None) -> Optional[float]:
        """Per-coordinate bound on the error of the pseudo-gradient (module docstring).

        ``num_summed``: devices whose masked vectors are in the sum; ``weight_sum``: ``Σ a_k``;
        ``expected_clients``: ``K`` under DP (the sum is divided by it), else None.
        """
        if num_summed <= 0:
            return None
        if expected_clients is not None:
            return num_summed * self.level / expected_clients
        return None if weight_sum <= 0 else num_summed * self.level / weight_sum

    def flower_arguments(self, timeout: Optional[float]) -> dict[str, Any]:
        """Keyword arguments of ``flwr.server.workflow.SecAggPlusWorkflow``."""
        return dict(num_shares=1.0 if self.num_shares is None else self.num_shares,
                    reconstruction_threshold=self.reconstruction_threshold, max_weight=self.max_weight,
                    clipping_range=self.clipping_range, quantization_range=self.quantization_range,
                    modulus_range=MODULUS_RANGE, timeout=timeout)

    def summary(self) -> dict[str, Any]:
        return {"protocol": "SecAgg+ (Flower)", "num_shares": self.num_shares or "all sampled devices",
                "reconstruction_threshold": self.reconstruction_threshold, "clipping_range": self.clipping_range,
                "quantization_range": self.quantization_range, "max_weight": self.max_weight,
                "weighting": self.weighting, "device_clip_norm": self.dp_clip_norm,
                "quantization_level": self.level}


def plan_secure_aggregation(cfg: ExperimentConfig) -> Optional[SecAggPlan]:
    """``cfg``'s secure aggregation, resolved and checked; None when it is off.

    Raises :class:`ConfigError` naming the key for a setting SecAgg+ cannot honour.
    """
    sa = cfg.deploy.secure_aggregation
    if not sa.enabled:
        return None
    f = cfg.federated
    key = "deploy.secure_aggregation"
    devices = f.clients_per_round
    if devices < 3:
        raise ConfigError(f"{key} needs federated.clients_per_round >= 3, got {devices}: Flower's SecAgg+ shares each "
                          "device's keys with more than 2 devices")
    shares = sa.num_shares if sa.num_shares is not None else devices
    if shares > devices:
        raise ConfigError(f"{key}.num_shares ({shares}) exceeds federated.clients_per_round ({devices}): a device "
                          "shares its keys with sampled devices only")
    threshold = sa.reconstruction_threshold
    if threshold is None:
        threshold = min(shares - 1, max(2, math.ceil(2 * shares / 3)))
    if threshold >= shares:
        raise ConfigError(
            f"{key}.reconstruction_threshold ({threshold}) must be below the number of shares ({shares}"
            f"{', every sampled device' if sa.num_shares is None else ''}): with {shares} shares at most "
            f"{shares - 1} can be required, so that a device may drop out")
    # Σ of n quantised vectors (each entry in [0, Q]) must not wrap around the modulus.
    most = f.num_clients if (f.dp is not None and f.dp.sampling == "poisson") else devices
    if most * sa.quantization_range >= MODULUS_RANGE:
        raise ConfigError(f"{key}.quantization_range ({sa.quantization_range}) times the devices in a round "
                          f"({most}) must stay below the modulus 2^32, or the sum overflows")
    if f.compression is not None:
        raise ConfigError(f"{key} cannot be combined with federated.compression: SecAgg+ sums dense quantised "
                          "vectors, so devices send full-size masked updates; set federated.compression: null")
    weighting = f.weighting or ("uniform" if f.dp is not None else "examples")
    dp_clip = None
    if f.dp is not None:
        if f.dp.adaptive_clipping is not None:
            raise ConfigError(f"{key} with federated.dp.adaptive_clipping is not supported: the clipped count of "
                              "adaptive clipping would have to be securely summed too; use a fixed clip_norm")
        if sa.clipping_range < f.dp.clip_norm:
            raise ConfigError(f"{key}.clipping_range ({sa.clipping_range}) must be at least federated.dp.clip_norm "
                              f"({f.dp.clip_norm}): a coordinate of a clipped update can be as large as C, and "
                              "cutting it would break the stated quantisation bound")
        dp_clip = f.dp.clip_norm
    return SecAggPlan(num_shares=sa.num_shares, reconstruction_threshold=int(threshold),
                      clipping_range=float(sa.clipping_range), quantization_range=int(sa.quantization_range),
                      max_weight=1.0 if weighting == "uniform" else float(sa.max_weight), weighting=weighting,
                      dp_clip_norm=dp_clip)


# -- the device ---------------------------------------------------------------------


@dataclasses.dataclass
class Contribution:
    """What a device hands to ``secaggplus_mod`` (see :func:`device_contribution`)."""

    update: Any  # pytree like the delta, float64: zero if not finite, clipped to C under DP
    weight: int  # FitRes.num_examples: w_k
    finite: bool
    clipped_values: int  # coordinates of a_k · update beyond ±clipping_range (cut by the mod: outside the bound)


def device_contribution(delta: Any, num_examples: float, plan: SecAggPlan) -> Contribution:
    """The device-side half of the aggregation, before masking (module docstring).

    The non-finite check and DP's clipping run here because the server only sees the
    sum: they are :func:`fl.client_is_finite` and :func:`fl.clip_deltas`, the functions
    simulation applies on the server, on a one-client stack.
    """
    stacked = jax.tree.map(lambda x: jnp.asarray(x)[None], delta)
    finite = bool(fl.client_is_finite(stacked)[0])
    valid = finite and num_examples > 0
    if not valid:
        update = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float64), delta)
        return Contribution(update, 0, finite, 0)
    if plan.dp_clip_norm is not None:
        stacked, _ = fl.clip_deltas(stacked, jnp.asarray(plan.dp_clip_norm, jnp.float32))
    update = jax.tree.map(lambda x: np.asarray(jax.device_get(x[0]), np.float64), stacked)
    weight = plan.weight(num_examples)
    scale = plan.quantized_weight(weight)
    clipped = int(sum(int(np.sum(np.abs(leaf * scale) > plan.clipping_range)) for leaf in jax.tree.leaves(update)))
    return Contribution(update, weight, finite, clipped)


# -- the server ---------------------------------------------------------------------


def make_secure_server_step(server_optimizer: optax.GradientTransformation, *, min_clients: int,
                            noise_multiplier: Optional[float] = None,
                            expected_clients: Optional[float] = None) -> Callable[..., tuple[Any, dict]]:
    """``step(state, mean, num_valid) -> (state, metrics)``, compiled: the server's half of a
    SecAgg+ round from the unmasked mean (module docstring). DP when ``noise_multiplier`` is set
    (``state`` is then a :class:`fl.dp_fedavg.DPServerState` whose fixed ``clip`` is ``C``)."""

    def step(state: Any, mean: Any, num_valid: jax.Array) -> tuple[Any, dict]:
        chex.assert_trees_all_equal_shapes(mean, state.params)  # the unmasked mean is a parameters-shaped tree
        num_valid = jnp.asarray(num_valid, jnp.int32)
        if noise_multiplier is None:
            applied = num_valid >= min_clients
            # With no valid device Flower's mean is 0/0; it never reaches the optimiser.
            g = jax.tree.map(lambda m, p: jnp.where(applied, m, 0.0).astype(p.dtype), mean, state.params)
            metrics = {}
        else:
            applied = jnp.asarray(True)  # DP rounds are always applied (fl/privacy.py)
            clip_norm = state.clip.clip_norm
            total = jax.tree.map(lambda m: jnp.where(num_valid > 0, m.astype(jnp.float32) * num_valid, 0.0), mean)
            agg_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.round), fl.SERVER_STREAM)
            update_key, _ = jax.random.split(agg_rng)  # dp_aggregate's split: (update noise, count noise)
            noisy = fl.noisy_mean_of_sum(total, update_key, noise_multiplier * clip_norm, expected_clients)
            g = jax.tree.map(lambda x, p: x.astype(p.dtype), noisy, state.params)
            metrics = {"clip_norm": clip_norm, "next_clip_norm": clip_norm,
                       "noise_stddev": noise_multiplier * clip_norm / expected_clients}
        new_state = fl.apply_pseudo_gradient(server_optimizer, state, g, applied)
        metrics.update(applied=applied, num_valid_clients=num_valid, pseudo_gradient_norm=optax.tree.norm(g))
        return new_state, metrics

    return jax.jit(step)

