"""Server optimisers: optax transforms applied to the federated pseudo-gradient.

Every server optimiser here is a plain :class:`optax.GradientTransformation`.
The server feeds it the *pseudo-gradient* of round ``t``::

    g_t = x_t - sum_k w_k x_k / sum_k w_k        (= weighted mean of client deltas)

where ``x_t`` are the server's (trainable) parameters and ``x_k`` client ``k``'s
parameters after local training. The new server parameters are
``x_{t+1} = x_t + u_t`` with ``u_t, s_t = tx.update(g_t, s_{t-1}, x_t)``. Hence
``optax.sgd(1.0)`` gives ``x_{t+1} = mean_k x_k``: FedAvg.

Two families are offered for the adaptive methods (``variant=``):

* ``"reddi"`` -- the exact forms of Reddi et al., "Adaptive Federated
  Optimization" (ICLR 2021), Algorithm 2, written for ``Δ_t = -g_t``::

      m_t = β1 m_{t-1} + (1 - β1) Δ_t                       (m_{-1} = 0)
      FedAdagrad: v_t = v_{t-1} + Δ_t²
      FedAdam:    v_t = β2 v_{t-1} + (1 - β2) Δ_t²
      FedYogi:    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)
      x_{t+1} = x_t + η m_t / (√v_t + τ)                    (v_{-1} = τ²)

  τ is the ε *outside* the root, there is **no bias correction**, and the second
  moment starts at τ². FedAdamW adds decoupled weight decay λ to FedAdam:
  ``x_{t+1} = x_t + η (m_t / (√v_t + τ) - λ x_t)``.

* ``"optax"`` -- the stock optax optimiser of the same name (``optax.adam``,
  ``optax.adamw``, ``optax.yogi``, ``optax.adagrad``) with ``eps = τ``: bias
  correction, zero-initialised moments (yogi: 1e-6), and for ``adagrad`` no
  momentum and ε inside the root. Kept because results in the wider literature
  are often produced with these.

FedAvg and FedAvgM have a single form (``optax.sgd``). Naming note: "FedAdamW"
here means *server-side* AdamW on the pseudo-gradient (as in the DEEM 2024 paper
this project reproduces); a 2025 paper uses the same name for a *client-side*
AdamW method with local corrections -- a different algorithm.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

Variant = Literal["reddi", "optax"]
ScalarOrSchedule = float | optax.Schedule


class ReddiAdaptiveState(NamedTuple):
    """State of :func:`scale_by_reddi_adaptive`: first and second moments."""

    mu: optax.Params
    nu: optax.Params


def scale_by_reddi_adaptive(
    rule: Literal["adam", "yogi", "adagrad"],
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
) -> optax.GradientTransformation:
    """Rescales ``g`` by Reddi et al.'s adaptive rule (Algorithm 2), no learning rate.

    For the incoming pseudo-gradient ``g`` (so ``Δ = -g``)::

        m_t = β1 m_{t-1} + (1 - β1) g
        adam:    v_t = β2 v_{t-1} + (1 - β2) g²
        yogi:    v_t = v_{t-1} - (1 - β2) g² sign(v_{t-1} - g²)
        adagrad: v_t = v_{t-1} + g²
        output:  m_t / (√v_t + τ)

    with ``m_{-1} = 0``, ``v_{-1} = τ²`` and no bias correction. Chained with
    ``scale_by_learning_rate(η)`` (which negates) this is
    ``x_{t+1} = x_t + η m_t(Δ) / (√v_t + τ)``.
    """
    if rule not in ("adam", "yogi", "adagrad"):
        raise ValueError(f"unknown adaptive rule {rule!r}; expected 'adam', 'yogi' or 'adagrad'")
    if tau <= 0:
        raise ValueError(f"tau must be positive (it is the denominator's ε and v₀ = τ²), got {tau}")

    def init_fn(params: optax.Params) -> ReddiAdaptiveState:
        mu = jax.tree.map(jnp.zeros_like, params)
        nu = jax.tree.map(lambda p: jnp.full_like(p, tau**2), params)
        return ReddiAdaptiveState(mu=mu, nu=nu)

    def second_moment(g: jax.Array, v: jax.Array) -> jax.Array:
        g2 = jnp.square(g)
        if rule == "adam":
            return b2 * v + (1.0 - b2) * g2
        if rule == "yogi":
            return v - (1.0 - b2) * g2 * jnp.sign(v - g2)
        return v + g2

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: b1 * m + (1.0 - b1) * g, updates, state.mu)
        nu = jax.tree.map(second_moment, updates, state.nu)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + tau), mu, nu)
        return out, ReddiAdaptiveState(mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def fedavg(learning_rate: ScalarOrSchedule = 1.0) -> optax.GradientTransformation:
    """FedAvg (McMahan et al. 2017): ``x_{t+1} = x_t - η g_t``; η = 1 averages the clients."""
    return optax.sgd(learning_rate)


def fedavgm(
    learning_rate: ScalarOrSchedule = 1.0, momentum: float = 0.9, nesterov: bool = False
) -> optax.GradientTransformation:
    """FedAvgM (Hsu et al. 2019), server momentum::

        m_t = β m_{t-1} + g_t,    x_{t+1} = x_t - η m_t          (m_{-1} = 0)

    (``nesterov=True``: ``x_{t+1} = x_t - η (g_t + β m_t)``.)
    """
    return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


def fedadam(
    learning_rate: ScalarOrSchedule = 10**-1.5,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    variant: Variant = "reddi",
) -> optax.GradientTransformation:
    """FedAdam. ``reddi``: ``m_t = β1 m + (1-β1) g``, ``v_t = β2 v + (1-β2) g²``,
    ``x_{t+1} = x_t - η m_t / (√v_t + τ)``, v₀ = τ², no bias correction.
    ``optax``: ``optax.adam(η, β1, β2, eps=τ)`` (bias-corrected m̂, v̂; v₀ = 0)."""
    if variant == "optax":
        return optax.adam(learning_rate, b1=b1, b2=b2, eps=tau)
    _check_variant(variant)
    return optax.chain(scale_by_reddi_adaptive("adam", b1, b2, tau), optax.scale_by_learning_rate(learning_rate))


def fedadamw(
    learning_rate: ScalarOrSchedule = 10**-1.5,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    weight_decay: float = 1e-4,
    variant: Variant = "reddi",
) -> optax.GradientTransformation:
    """FedAdamW: server Adam with decoupled weight decay λ (Loshchilov & Hutter 2019).

    ``reddi``: FedAdam's moments, then ``x_{t+1} = x_t - η (m_t / (√v_t + τ) + λ x_t)``.
    ``optax``: ``optax.adamw(η, β1, β2, eps=τ, weight_decay=λ)`` (bias-corrected).
    Not the client-side "FedAdamW" of a 2025 paper; see the module docstring.
    """
    if variant == "optax":
        return optax.adamw(learning_rate, b1=b1, b2=b2, eps=tau, weight_decay=weight_decay)
    _check_variant(variant)
    return optax.chain(
        scale_by_reddi_adaptive("adam", b1, b2, tau),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def fedyogi(
    learning_rate: ScalarOrSchedule = 10**-1.5,
    b1: float = 0.9,
    b2: float = 0.99,
    tau: float = 1e-3,
    variant: Variant = "reddi",
) -> optax.GradientTransformation:
    """FedYogi. ``reddi``: ``v_t = v - (1-β2) g² sign(v - g²)``, ``m_t = β1 m + (1-β1) g``,
    ``x_{t+1} = x_t - η m_t / (√v_t + τ)``, v₀ = τ², no bias correction.
    ``optax``: ``optax.yogi(η, β1, β2, eps=τ)`` (m₀ = v₀ = 1e-6, bias-corrected)."""
    if variant == "optax":
        return optax.yogi(learning_rate, b1=b1, b2=b2, eps=tau)
    _check_variant(variant)
    return optax.chain(scale_by_reddi_adaptive("yogi", b1, b2, tau), optax.scale_by_learning_rate(learning_rate))


def fedadagrad(
    learning_rate: ScalarOrSchedule = 10**-1.5,
    b1: float = 0.9,
    tau: float = 1e-3,
    variant: Variant = "reddi",
    initial_accumulator_value: float = 0.1,
) -> optax.GradientTransformation:
    """FedAdagrad. ``reddi``: ``v_t = v + g²``, ``m_t = β1 m + (1-β1) g``,
    ``x_{t+1} = x_t - η m_t / (√v_t + τ)``, v₀ = τ².
    ``optax``: ``optax.adagrad(η, initial_accumulator_value, eps=τ)``: no momentum,
    ``x_{t+1} = x_t - η g / √(v_t + τ)`` where ``v_t = v + g²``, v₀ = initial_accumulator_value."""
    if variant == "optax":
        return optax.adagrad(learning_rate, initial_accumulator_value=initial_accumulator_value, eps=tau)
    _check_variant(variant)
    return optax.chain(scale_by_reddi_adaptive("adagrad", b1, 0.0, tau), optax.scale_by_learning_rate(learning_rate))


def server_learning_rate(
    learning_rate: float,
    schedule: Literal["constant", "cosine"] = "constant",
    total_steps: int = 1,
    final_fraction: float = 0.1,
) -> ScalarOrSchedule:
    """The server learning rate ``η_t`` of applied server step ``t`` (0-based).

    ``constant``: ``η_t = η``. ``cosine`` (Loshchilov & Hutter's annealing without
    restarts, ``optax.cosine_decay_schedule``) over ``T = total_steps`` steps::

        η_t = η (f + (1 - f) (1 + cos(π min(t, T) / T)) / 2)

    from ``η`` at ``t = 0`` down to ``f η`` (``f = final_fraction``) at ``t = T`` and
    after. Why: an adaptive server step has a size of about ``η`` per coordinate however
    small the clients' deltas become, so a rate that learns fast early keeps the model
    jumping around the optimum at the end; annealing it lets the last rounds settle.
    ``t`` counts the steps the server applied (a skipped round leaves the optimiser
    state, and so its step count, unchanged).
    """
    if schedule == "constant":
        return learning_rate
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; expected 'constant' or 'cosine'")
    if total_steps < 1:
        raise ValueError(f"a cosine schedule needs total_steps >= 1, got {total_steps}")
    if not 0.0 <= final_fraction <= 1.0:
        raise ValueError(f"final_fraction must be in [0, 1], got {final_fraction}")
    return optax.cosine_decay_schedule(learning_rate, total_steps, alpha=final_fraction)


def _check_variant(variant: str) -> None:
    if variant not in ("reddi", "optax"):
        raise ValueError(f"unknown server optimiser variant {variant!r}; expected 'reddi' or 'optax'")


SERVER_OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "fedavg": fedavg,
    "fedavgm": fedavgm,
    "fedadam": fedadam,
    "fedadamw": fedadamw,
    "fedyogi": fedyogi,
    "fedadagrad": fedadagrad,
}


def server_optimizer(name: str, **kwargs: Any) -> optax.GradientTransformation:
    """Builds a server optimiser by name, e.g.
    ``server_optimizer("fedadam", learning_rate=10**-1.5, b1=0.9, b2=0.99, tau=1e-3, variant="reddi")``.

    Names: ``fedavg``, ``fedavgm``, ``fedadam``, ``fedadamw``, ``fedyogi``,
    ``fedadagrad`` (case-insensitive). Keyword arguments are those of the factory
    of the same name in this module; an unknown one raises ``TypeError`` naming it.
    """
    key = name.lower()
    if key not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimiser {name!r}; known: {sorted(SERVER_OPTIMIZERS)}")
    factory = SERVER_OPTIMIZERS[key]
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise TypeError(f"server optimiser {key!r}: {err}") from None
