"""Dropout masks: the right keep rate, and the same masks whether clients run one by one or vmapped."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_fm.models.layers import dropout_bits, dropout_seed, dropout_with_seed


def test_vmapped_masks_equal_one_by_one():
    seeds = jax.vmap(dropout_seed)(jax.random.split(jax.random.PRNGKey(0), 3))
    batched = jax.vmap(lambda s: dropout_bits(s, (16, 32)))(seeds)
    for i in range(3):
        np.testing.assert_array_equal(batched[i], dropout_bits(seeds[i], (16, 32)))
    assert not np.array_equal(batched[0], batched[1])


def test_keep_rate_and_inverted_scaling():
    seed = dropout_seed(jax.random.PRNGKey(1))
    y = np.asarray(dropout_with_seed(jnp.ones((500, 400)), seed, 0.1))
    kept = y > 0
    assert abs(kept.mean() - 0.9) < 0.005  # 200k Bernoulli(0.9) draws: std ~0.0007
    np.testing.assert_allclose(y[kept], 1 / 0.9, rtol=1e-6)
    bits = np.asarray(dropout_bits(seed, (1 << 16,)))
    for k in (0, 13, 31):  # every bit position balanced
        assert abs(((bits >> k) & 1).mean() - 0.5) < 0.01
