"""Client sampling as a pure function of (seed, round).

No hidden state: a resumed run (or another process) that asks for round ``t``
gets exactly the clients the original run trained in round ``t``.
"""

from __future__ import annotations

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
