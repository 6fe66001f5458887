"""Client sampling as a pure function of (seed, round).

No hidden state: a resumed run (or another process) that asks for round ``t``
gets exactly the clients the original run trained in round ``t``.

Two schemes, the two a privacy accountant models (``fl/accountant.py``):

* :func:`sample_clients` — fixed size ``K`` uniformly without replacement
  (``SampledWithoutReplacementDpEvent``, replace-one neighbours, RDP only);
* :func:`poisson_sample_clients` — each client independently with probability
  ``q`` (``PoissonSampledDpEvent``, add/remove-one neighbours, RDP and PLD).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def sample_clients(seed: int, round_index: int, population: int, clients_per_round: int) -> np.ndarray:
    """Client ids for round ``round_index``: a uniform draw without replacement.

    ``ids = permutation(fold_in(fold_in(PRNGKey(seed), SAMPLING_TAG), round))[:k]``,
    sorted ascending so that stacking order does not depend on the draw order.
    The sampling key is derived from a fixed tag so that it never coincides with
    the training keys ``fold_in(PRNGKey(seed), round)``.

    Returns an int64 NumPy array of shape ``[clients_per_round]`` (host data: it
    decides which client batches to build).
    """
    if population <= 0:
        raise ValueError(f"population must be positive, got {population}")
    if not 0 < clients_per_round <= population:
        raise ValueError(f"clients_per_round must be in [1, population={population}], got {clients_per_round}")
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    if clients_per_round == population:
        return np.arange(population, dtype=np.int64)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _SAMPLING_TAG), round_index)
    perm = jax.random.permutation(key, jnp.arange(population))
    return np.sort(np.asarray(perm[:clients_per_round], dtype=np.int64))


# An arbitrary constant separating the sampling stream from the training stream.
_SAMPLING_TAG = 0x5A3D1E


class PoissonSample(NamedTuple):
    """A Poisson draw padded to a static size.

    ``ids``: int64 ``[max_clients]``, the sampled ids ascending, then padding
    (id 0: padded slots must get zero-weight batches; ``mask`` says which are real).
    ``mask``: bool ``[max_clients]``. ``count``: how many clients were sampled.
    """

    ids: np.ndarray
    mask: np.ndarray
    count: int


def poisson_max_clients(population: int, rate: float, overflow_prob: float = 1e-12) -> int:
    """The smallest cap ``m`` with ``P[Binomial(population, rate) > m] <= overflow_prob``.

    Padding every round to ``m`` slots keeps one compiled shape. A draw above the cap
    is refused (see :func:`poisson_sample_clients`), never truncated: dropping sampled
    clients would change the sampling the accountant assumes. The tail is computed
    exactly (scipy's binomial survival function), so over ``T`` rounds the chance
    that any round is refused is at most ``T · overflow_prob`` (union bound).
    """
    _check_poisson(population, rate)
    if not 0.0 < overflow_prob < 1.0:
        raise ValueError(f"overflow_prob must be in (0, 1), got {overflow_prob}")
    from scipy.stats import binom  # a dependency of dp-accounting

    m = int(binom.isf(overflow_prob, population, rate))
    m = max(0, min(m, population))
    while m < population and binom.sf(m, population, rate) > overflow_prob:
        m += 1  # isf is a float inverse: make sure the exact tail is within the bound
    return max(m, 1)


def poisson_sample_clients(
    seed: int, round_index: int, population: int, rate: float, max_clients: int | None = None
) -> PoissonSample:
    """Clients of round ``round_index`` under Poisson sampling with rate ``q``.

    ``u = uniform(fold_in(fold_in(PRNGKey(seed), POISSON_TAG), round))[population]``;
    client ``c`` participates iff ``u[c] < q``. The tag differs from the fixed-size
    sampler's and from the training keys, so the streams never coincide.

    ``max_clients`` (default :func:`poisson_max_clients` with overflow probability
    1e-12 per round) is the static padded size. A round that samples more clients
    raises ``ValueError``: the run stops rather than silently truncating the sample
    (which would void the accountant's Poisson assumption).
    """
    _check_poisson(population, rate)
    if round_index < 0:
        raise ValueError(f"round_index must be >= 0, got {round_index}")
    cap = poisson_max_clients(population, rate) if max_clients is None else int(max_clients)
    if not 0 < cap <= population:
        raise ValueError(f"max_clients must be in [1, population={population}], got {max_clients}")
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _POISSON_TAG), round_index)
    chosen = np.asarray(jax.random.uniform(key, (population,)) < rate)
    ids = np.flatnonzero(chosen).astype(np.int64)
    if ids.size > cap:
        raise ValueError(
            f"Poisson sampling drew {ids.size} clients in round {round_index}, above the static cap "
            f"max_clients={cap} (population={population}, rate={rate}); refusing to truncate the sample, "
            "which would break the privacy accountant's Poisson assumption. Raise max_clients."
        )
    padded = np.zeros([cap], np.int64)
    padded[: ids.size] = ids
    mask = np.arange(cap) < ids.size
    return PoissonSample(ids=padded, mask=mask, count=int(ids.size))


def _check_poisson(population: int, rate: float) -> None:
    if population <= 0:
        raise ValueError(f"population must be positive, got {population}")
    if not (math.isfinite(rate) and 0.0 < rate <= 1.0):
        raise ValueError(f"rate must be in (0, 1], got {rate}")


# Separates the Poisson sampling stream from the fixed-size one and from training.
_POISSON_TAG = 0x9015_50
