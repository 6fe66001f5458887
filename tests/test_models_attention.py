"""The XLA attention core's hand-written backward pass equals autodiff of the plain expression.

``layers.xla_attention`` (what ``attention_weights_and_output`` runs off the CPU, in
bfloat16 or with dropout; ``test_cpu_attention.py`` covers the fused CPU kernel) has a
custom VJP (FlashAttention's equations); these tests compare it with ``jax.grad`` through the textbook formula, for every input
that can carry a gradient (q, k, v and the position bias), with and without dropout,
with a bias shared by the batch or per row, with fully masked (all-padding) rows, and
in bfloat16.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm.models import layers
from fedjax_fm.models.t5 import segment_mask

B, Q, K, H, D = 3, 12, 12, 2, 8


def reference(query, key, value, bias, mask, seed=None, rate=0.0):
    """The forward expression, differentiated by autodiff."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = jnp.where(mask, scores, layers._MASKED_LOGIT)
    weights = jax.nn.softmax(scores, axis=-1)
    if seed is not None:
        weights = layers.dropout_with_seed(weights, seed, rate)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(value.dtype), value)


def inputs(dtype=jnp.float32, bias_batch=1, q_len=Q):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, q_len, H, D)), dtype)
    k = jnp.asarray(rng.normal(size=(B, K, H, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, K, H, D)), dtype)
    bias = jnp.asarray(rng.normal(size=(bias_batch, H, q_len, K)), jnp.float32)
    # Packed rows: row 0 two segments, row 1 one segment and padding, row 2 all padding.
    segments = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3, [0] * 12])
    mask = segment_mask(jnp.asarray(segments[:, :q_len]), jnp.asarray(segments))
    return q, k, v, bias, mask


def grads(fn, q, k, v, bias, mask, **kwargs):
    # A cotangent that is not all ones, so that every output entry is weighted differently.
    weight = jnp.asarray(np.random.default_rng(1).normal(size=q.shape[:2] + v.shape[2:]), jnp.float32)

    def loss(q, k, v, bias):
        return jnp.sum(fn(q, k, v, bias, mask, **kwargs).astype(jnp.float32) * weight)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)


@pytest.mark.parametrize("bias_batch", [1, B])
@pytest.mark.parametrize("dropout", [False, True])
def test_backward_matches_autodiff(bias_batch, dropout):
    q, k, v, bias, mask = inputs(bias_batch=bias_batch)
    seed = jnp.array([7, 11], jnp.uint32)
    ours = grads(layers.xla_attention, q, k, v, bias, mask,
                 **(dict(dropout_seed=seed, dropout_rate=0.25) if dropout else {}))
    expected = grads(reference, q, k, v, bias, mask, **(dict(seed=seed, rate=0.25) if dropout else {}))
    for name, a, b in zip("qkv", ours[:3], expected[:3]):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(ours[3], expected[3], atol=2e-6, rtol=1e-5, err_msg="bias")
    assert ours[3].shape == bias.shape
    # An all-padding row gets no gradient into its queries (its softmax is uniform but masked).
    np.testing.assert_array_equal(ours[0][2], 0.0)
    assert np.abs(np.asarray(ours[3])).max() > 0


def test_forward_is_the_plain_expression():
    q, k, v, bias, mask = inputs()
    np.testing.assert_array_equal(layers.xla_attention(q, k, v, bias, mask),
                                  reference(q, k, v, bias, mask))


def test_cross_attention_shapes_and_no_bias():
    """Queries shorter than keys (cross attention) and no bias, no mask."""
    q, k, v, _, _ = inputs(q_len=5)
    ours = jax.grad(lambda q, k, v: layers.xla_attention(q, k, v, None, None).sum(),
                    argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda q, k, v: reference(q, k, v, None, None).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_bfloat16_close_to_float32():
    q, k, v, bias, mask = inputs()
    half = grads(layers.xla_attention, *(x.astype(jnp.bfloat16) for x in (q, k, v)), bias, mask)
    full = grads(reference, q, k, v, bias, mask)
    for name, a, b in zip("qkvb", half, full):
        assert a.dtype == (jnp.float32 if name == "b" else jnp.bfloat16)
        scale = float(jnp.abs(b).max())
        assert float(jnp.abs(a.astype(jnp.float32) - b).max()) < 0.05 * scale, name


def test_vmap_over_clients_matches_one_by_one():
    q, k, v, bias, mask = inputs()
    stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]

    def grad_q(q, k, v):
        return jax.grad(lambda q: layers.xla_attention(q, k, v, bias, mask).sum())(q)

    batched = jax.vmap(grad_q)(*stacked)
    for i in range(2):
        np.testing.assert_allclose(batched[i], grad_q(*(s[i] for s in stacked)), atol=1e-5, rtol=1e-5)
