"""Building blocks of T5 v1.1 / FLAN-T5 in Flax linen, faithful to Hugging Face's PyTorch T5.

Every module here takes the model's :class:`~fedjax_fm.models.config.T5Config`; the
names of the modules are Hugging Face's (``SelfAttention``, ``DenseReluDense``,
``layer_norm`` ...) so the parameter tree reads like the PyTorch state dict (the
table is in ``config.py``).

Precision policy: parameters are stored in ``config.param_dtype`` and cast to
``config.dtype`` (the compute dtype) where they are used; the RMS norm, the attention
softmax (scores, position bias and mask included) and the loss always run in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_fm.models import cpu_attention
from fedjax_fm.models.config import LoraConfig, T5Config

Array = jax.Array

# Additive value for masked attention logits. A finite minimum (as Hugging Face uses)
# rather than -inf keeps a fully masked row (an all-padding example) finite: its
# softmax is uniform instead of NaN, and NaN would survive a zero loss weight.
_MASKED_LOGIT = float(jnp.finfo(jnp.float32).min)


def normal_init(stddev: float) -> nn.initializers.Initializer:
    return nn.initializers.normal(stddev=stddev)


def dropout_seed(key: Array) -> Array:
    """A dropout seed (uint32[2]) derived from a JAX PRNG key."""
    data = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    return jnp.stack([data[0], data[-1] ^ jnp.uint32(0x9E3779B9)])


def _mix32(x: Array) -> Array:
    """Chris Wellons' ``lowbias32`` integer finaliser: a bijective avalanche on uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_bits(seed: Array, shape: tuple[int, ...]) -> Array:
    """uint32 random bits of ``shape``, a counter-based hash of (seed, element index).

    ``bits[i] = mix(mix(i * phi + s0) ^ s1)`` with ``mix`` the lowbias32 finaliser.
    Purely elementwise, so it is exact under ``vmap``/sharding (a vmapped group of
    clients draws the same masks as the clients one by one, which XLA's
    ``rng_bit_generator`` does not guarantee) and cheap to compile and recompute under
    ``jax.checkpoint`` (threefry per element unrolls into a large graph at every
    dropout site). Statistical quality is ample for Bernoulli masks.
    """
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    x = _mix32(index * jnp.uint32(0x9E3779B9) + seed[0])
    return _mix32(x ^ seed[1])


def dropout_with_seed(x: Array, seed: Array, rate: float) -> Array:
    """Inverted dropout ``x * keep / (1 - rate)``, ``keep ~ Bernoulli(1 - rate)`` drawn
    from ``dropout_bits``: a pure function of ``seed``, so it can be recomputed under
    ``jax.checkpoint`` instead of storing the mask."""
    if rate >= 1.0:
        return jnp.zeros_like(x)
    bits = dropout_bits(seed, x.shape)
    keep_prob = 1.0 - rate
    keep = bits < jnp.uint32(min(int(keep_prob * 2.0**32), 2**32 - 1))
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """Inverted dropout with ``flax.linen.Dropout``'s semantics (rng stream ``"dropout"``,
    active only when ``deterministic=False``).

    The mask's random bits come from ``dropout_bits`` (a counter-based integer hash)
    seeded by this module's ``"dropout"`` key, instead of a threefry hash per element:
    threefry unrolls into a large graph at every dropout site, which made compiling a
    T5 training step several times slower and its masks expensive to draw on CPU.
    Deterministic for a given key, on every backend and under ``vmap``.
    """

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        return dropout_with_seed(x, dropout_seed(self.make_rng("dropout")), self.rate)


def _dense(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` over the last axis of ``x``, computed as one 2-D matmul.

    Same product as ``jnp.dot(x, kernel)``, but flattening the leading axes first makes
    the backward pass's weight gradient a plain 2-D GEMM: with a 3-D ``x`` XLA CPU
    contracts over two axes (batch and sequence), which measured 1.75x slower for the
    gated feed-forward block of flan-t5-small (fwd+bwd, batch 8 x 512 tokens).
    """
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


class LoraDense(nn.Module):
    """A bias-free projection ``y = x W`` with an optional LoRA adapter.

    ``W`` is the parameter ``kernel`` [in, out]. If the module also sees the variables
    ``lora_A`` [in, r] and ``lora_B`` [r, out] in the ``"lora"`` collection (created by
    ``fedjax_fm.models.lora``, never by ``init``), the output becomes

        y = x W + (alpha / r) * dropout(x) A B

    with ``alpha`` and the dropout rate from ``lora`` and the rank ``r`` read from
    ``A``'s shape (PEFT's convention).
    """

    features: int
    kernel_init: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        x = x.astype(self.dtype)
        y = _dense(x, kernel.astype(self.dtype))
        if self.has_variable("lora", "lora_A"):
            if self.lora is None:
                raise ValueError(
                    f"module {'/'.join(self.scope.path)} has 'lora' variables but the model was built "
                    "without a LoraConfig: pass T5(config, lora=LoraConfig(...))"
                )
            lora_a = self.get_variable("lora", "lora_A")
            lora_b = self.get_variable("lora", "lora_B")
            if lora_a.shape[0] != x.shape[-1] or lora_b.shape != (lora_a.shape[1], self.features):
                raise ValueError(
                    f"LoRA shapes at {'/'.join(self.scope.path)}: lora_A {lora_a.shape}, lora_B {lora_b.shape}; "
                    f"expected [{x.shape[-1]}, r] and [r, {self.features}]"
                )
            scaling = self.lora.alpha / lora_a.shape[1]
            x_drop = Dropout(rate=self.lora.dropout)(x, deterministic=deterministic)
            y = y + scaling * _dense(_dense(x_drop, lora_a.astype(self.dtype)), lora_b.astype(self.dtype))
        return y


class T5LayerNorm(nn.Module):
    """T5's RMS norm: ``y = scale * x / sqrt(mean(x^2) + eps)``.

    No mean subtraction and no bias. Computed in float32 whatever the compute dtype
    (as Hugging Face does), then cast to ``dtype``.
    """

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(variance + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def relative_position_bucket(
    relative_position: Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> Array:
    """Maps ``memory_position - query_position`` to a bucket in ``[0, num_buckets)``.

    Mesh TensorFlow's scheme (Raffel et al. 2020), as in Hugging Face:

    * bidirectional (encoder): half the buckets for positive offsets, half for the rest;
      causal (decoder): only offsets ``<= 0`` count, as ``n = max(-offset, 0)``.
    * within a half of ``B`` buckets, ``n < B/2`` gets its own bucket ``n``; larger ``n``
      shares logarithmically wider buckets
      ``B/2 + floor(log(n / (B/2)) / log(max_distance / (B/2)) * (B - B/2))``,
      capped at ``B - 1``.
    """
    relative_position = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(relative_position)
    else:
        n = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # float32 like the reference; the max() only keeps log() finite where is_small anyway.
    n_float = jnp.maximum(n, 1).astype(jnp.float32)
    if_large = max_exact + (
        jnp.log(n_float / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    if_large = jnp.minimum(if_large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, if_large)


def _sum_over_leading_axis(x: Array) -> Array:
    """``x.sum(0, keepdims=True)`` computed as the matrix product ``ones[1, B] @ x[B, -1]``.

    Same sum; the form matters for speed on XLA:CPU (jax 0.10). A reduction over the
    leading axis of an [8, 6, 512, 512] array goes to YNNPACK's reduce: 88 ms, against
    2.7 ms for this product on the 2-core CPU. (Unrolled adds of the slices take 2.3 ms
    alone, but XLA fused them with the transposed write of the position-bias embedding
    gradient into one strided loop that took 0.28 s per training step.)
    """
    ones = jnp.ones((1, x.shape[0]), x.dtype)
    flat = jnp.dot(ones, x.reshape(x.shape[0], -1), precision=jax.lax.Precision.HIGHEST)
    return flat.reshape(1, *x.shape[1:])


def _sum_to_shape(x: Array, shape: tuple[int, ...]) -> Array:
    """Sums ``x`` over the axes that ``shape`` broadcasts (the gradient of a broadcast).

    The batch axis of a position bias shared by the batch ([1, H, Q, K]) is summed with
    ``_sum_over_leading_axis``, the fast form on XLA:CPU.
    """
    shape = (1,) * (x.ndim - len(shape)) + tuple(shape)
    if shape[0] == 1 and x.shape[0] > 1:
        x = _sum_over_leading_axis(x)
    axes = tuple(i for i, (have, want) in enumerate(zip(x.shape, shape)) if want == 1 and have > 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def _attention_weights(query: Array, key: Array, bias: Array | None, mask: Array | None) -> Array:
    """``softmax(q k^T + bias, masked)`` [B, H, Q, K] in float32."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, _MASKED_LOGIT)
    return jax.nn.softmax(scores, axis=-1)


def _kept_weights(weights: Array, dtype: Any, seed: Array | None, rate: float) -> Array:
    """``dropout(weights)`` (the same keep mask for the same seed) in ``dtype``."""
    if seed is not None and rate > 0.0:
        weights = dropout_with_seed(weights, seed, rate)
    return weights.astype(dtype)


def _attention_forward(query, key, value, bias, mask, seed, rate) -> tuple[Array, Array]:
    """The softmax weights [B, H, Q, K] (float32) and the output ``dropout(weights) v`` [B, Q, H, D]."""
    weights = _attention_weights(query, key, bias, mask)
    kept = _kept_weights(weights, value.dtype, seed, rate)
    return weights, jnp.einsum("bhqk,bkhd->bqhd", kept, value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(query, key, value, bias, mask, seed, rate):
    return _attention_forward(query, key, value, bias, mask, seed, rate)[1]


def _attention_fwd(query, key, value, bias, mask, seed, rate):
    weights, out = _attention_forward(query, key, value, bias, mask, seed, rate)
    return out, (query, key, value, bias, mask, seed, weights, out)


def _attention_bwd(rate, residuals, d_out):
    """The attention core's backward pass, written out (FlashAttention's equations).

    With ``P = softmax(S)``, ``P~ = dropout(P)`` (a fixed linear map: keep mask and
    ``1/(1-rate)``) and ``O = P~ V``:

        dV = P~^T dO,    dP~ = dO V^T,    dP = dropout(dP~)
        dS = P (dP - D),  D_q = sum_k P_qk dP_qk = sum_k P~_qk dP~_qk = sum_d dO_qd O_qd
        dQ = dS K,       dK = dS^T Q,    d bias = dS summed over the axes bias broadcasts

    (and dS = 0 where the mask hides a pair). ``D`` from ``dO`` and ``O`` reads two
    [B, Q, H, D] arrays instead of the two [B, H, Q, K] ones that autodiff's softmax
    rule reduces; together with products laid out as XLA:CPU runs them fastest, this
    made the attention core's forward + backward 1.3-1.6x faster than autodiff's
    (flan-t5-small, 6 rows of 512 tokens, 2-core CPU; ``docs/benchmarks.md``).
    """
    query, key, value, bias, mask, seed, weights, out = residuals
    kept = _kept_weights(weights, value.dtype, seed, rate)
    d_value = jnp.einsum("bhqk,bqhd->bkhd", kept, d_out.astype(value.dtype))
    d_kept = jnp.einsum("bqhd,bkhd->bhqk", d_out, value, preferred_element_type=jnp.float32)
    d_weights = dropout_with_seed(d_kept, seed, rate) if seed is not None and rate > 0.0 else d_kept
    row_dot = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_scores = weights * (d_weights - row_dot[..., None])
    if mask is not None:
        d_scores = jnp.where(mask, d_scores, 0.0)
    d_query = jnp.einsum("bhqk,bkhd->bqhd", d_scores.astype(query.dtype), key)
    d_key = jnp.einsum("bhqk,bqhd->bkhd", d_scores.astype(key.dtype), query)
    d_bias = None if bias is None else _sum_to_shape(d_scores, bias.shape).reshape(bias.shape).astype(bias.dtype)
    return d_query, d_key, d_value, d_bias, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def xla_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    mask: Array | None,
    dropout_seed: Array | None = None,
    dropout_rate: float = 0.0,
) -> Array:
    """``attention_weights_and_output`` as XLA ops, on every backend and dtype.

    The backward pass is hand-written (``_attention_bwd``); the forward pass computes
    exactly what the plain expression does.
    """
    if dropout_seed is None or dropout_rate <= 0.0:
        dropout_seed, dropout_rate = None, 0.0
    return _attention(query, key, value, bias, mask, dropout_seed, float(dropout_rate))


def attention_weights_and_output(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    mask: Array | None,
    dropout_seed: Array | None = None,
    dropout_rate: float = 0.0,
) -> Array:
    """T5 attention: ``softmax(q k^T + bias, masked) v`` with NO ``1/sqrt(d)`` scaling.

    T5 folds the scaling into the initialisation of ``q``. Shapes: ``query`` [B, Q, H, D],
    ``key``/``value`` [B, K, H, D], ``bias`` broadcastable to [B, H, Q, K] (float32),
    ``mask`` boolean broadcastable to [B, H, Q, K] (True = may attend). Scores, bias,
    mask and softmax are float32; the weighted sum runs in the value's dtype. With a
    ``dropout_seed`` the attention weights are dropped out at ``dropout_rate``.

    On the CPU, in float32 and without dropout, one fused kernel computes it
    (``cpu_attention``: blocks that stay in cache, and only the keys the mask shows);
    otherwise ``xla_attention`` does.
    """
    active_dropout = dropout_seed is not None and dropout_rate > 0.0
    if not active_dropout and cpu_attention.usable(query, key, value, bias, mask):
        return cpu_attention.attention(query, key, value, bias, mask)
    return xla_attention(query, key, value, bias, mask, dropout_seed, dropout_rate)


class T5Attention(nn.Module):
    """Multi-head attention of T5 (self or encoder-decoder), bias-free projections.

    Block 0 of each stack owns ``relative_attention_bias`` (an embedding [buckets, heads])
    and computes the position bias that the other blocks of the stack reuse.
    """

    config: T5Config
    lora: LoraConfig | None = None
    has_relative_attention_bias: bool = False
    bidirectional: bool = True

    def setup(self) -> None:
        c = self.config
        inner = c.num_heads * c.d_kv

        def proj(features: int, stddev: float) -> LoraDense:
            return LoraDense(features, normal_init(stddev), c.dtype, c.param_dtype, self.lora)

        # Hugging Face's init: q absorbs the 1/sqrt(d_kv) that the attention omits.
        self.q = proj(inner, (c.d_model * c.d_kv) ** -0.5)
        self.k = proj(inner, c.d_model**-0.5)
        self.v = proj(inner, c.d_model**-0.5)
        self.o = proj(c.d_model, inner**-0.5)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = nn.Embed(
                c.relative_attention_num_buckets,
                c.num_heads,
                embedding_init=normal_init(c.d_model**-0.5),
                dtype=jnp.float32,
                param_dtype=c.param_dtype,
            )

    def _split_heads(self, x: Array) -> Array:
        return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv)

    def compute_bias(self, query_length: int, key_length: int, query_offset: Array | int = 0) -> Array:
        """Position bias [1, H, Q, K] (float32) for queries at ``query_offset + arange(Q)``."""
        context = jnp.arange(query_length, dtype=jnp.int32)[:, None] + query_offset
        memory = jnp.arange(key_length, dtype=jnp.int32)[None, :]
        buckets = relative_position_bucket(
            memory - context,
            bidirectional=self.bidirectional,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance,
        )
        values = self.relative_attention_bias(buckets)  # [Q, K, H]
        return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)

    def project_kv(self, states: Array, deterministic: bool = True) -> tuple[Array, Array]:
        """Keys and values [B, L, H, D] of ``states`` [B, L, d_model]."""
        return (
            self._split_heads(self.k(states, deterministic)),
            self._split_heads(self.v(states, deterministic)),
        )

    def __call__(
        self,
        hidden: Array,
        mask: Array | None,
        position_bias: Array | None = None,
        kv_states: Array | None = None,
        kv: tuple[Array, Array] | None = None,
        deterministic: bool = True,
        query_offset: Array | int = 0,
    ) -> tuple[Array, Array | None]:
        """Attends from ``hidden`` [B, Q, d_model] to ``kv`` (precomputed keys/values), to
        ``kv_states`` (cross attention) or to ``hidden`` itself (self attention).

        Returns the output [B, Q, d_model] and the position bias used (computed here,
        from ``query_offset``, when this layer owns the relative bias and none is given).
        """
        query = self._split_heads(self.q(hidden, deterministic))
        if kv is None:
            kv = self.project_kv(hidden if kv_states is None else kv_states, deterministic)
        key, value = kv
        if position_bias is None and self.has_relative_attention_bias:
            position_bias = self.compute_bias(query.shape[1], key.shape[1], query_offset)
        seed = None
        if not deterministic and self.config.dropout_rate > 0.0:
            seed = dropout_seed(self.make_rng("dropout"))
        out = attention_weights_and_output(query, key, value, position_bias, mask, seed, self.config.dropout_rate)
        out = out.reshape(*out.shape[:2], -1)
        return self.o(out, deterministic), position_bias


class T5DenseReluDense(nn.Module):
    """T5's feed-forward: ``wo(dropout(act(x wi)))`` (ReLU, original T5) or the gated
    ``wo(dropout(gelu_new(x wi_0) * (x wi_1)))`` (T5 v1.1 / FLAN-T5; ``gelu_new`` is the
    tanh approximation of GELU)."""

    config: T5Config
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool = True) -> Array:
        c = self.config

        def proj(features: int, stddev: float, name: str) -> LoraDense:
            return LoraDense(features, normal_init(stddev), c.dtype, c.param_dtype, self.lora, name=name)

        if c.is_gated:
            gate = jax.nn.gelu(proj(c.d_ff, c.d_model**-0.5, "wi_0")(hidden, deterministic), approximate=True)
            linear = proj(c.d_ff, c.d_model**-0.5, "wi_1")(hidden, deterministic)
            hidden = gate * linear
        else:
            hidden = jax.nn.relu(proj(c.d_ff, c.d_model**-0.5, "wi")(hidden, deterministic))
        hidden = Dropout(rate=c.dropout_rate)(hidden, deterministic=deterministic)
        return proj(c.d_model, c.d_ff**-0.5, "wo")(hidden, deterministic)


class T5LayerFF(nn.Module):
    """Pre-norm residual feed-forward sublayer: ``x + dropout(FF(norm(x)))``."""

    config: T5Config
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, hidden: Array, deterministic: bool = True) -> Array:
        c = self.config
        normed = T5LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype, name="layer_norm")(hidden)
        out = T5DenseReluDense(c, self.lora, name="DenseReluDense")(normed, deterministic)
        return hidden + Dropout(rate=c.dropout_rate)(out, deterministic=deterministic)


class T5LayerSelfAttention(nn.Module):
    """Pre-norm residual self-attention sublayer, with an optional key/value cache.

    With ``cache`` (``{"k", "v"}`` [B, max_len, H, D]) and ``cache_index`` the layer
    handles one new position: it writes that position's key and value into the cache
    and attends over the whole cache (the causal mask hides positions not yet written).
    """

    config: T5Config
    lora: LoraConfig | None = None
    has_relative_attention_bias: bool = False
    bidirectional: bool = True

    def setup(self) -> None:
        c = self.config
        self.layer_norm = T5LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype)
        self.SelfAttention = T5Attention(c, self.lora, self.has_relative_attention_bias, self.bidirectional)
        self.dropout = Dropout(rate=c.dropout_rate)

    def __call__(
        self,
        hidden: Array,
        mask: Array | None,
        position_bias: Array | None,
        deterministic: bool = True,
        cache: dict[str, Array] | None = None,
        cache_index: Array | None = None,
    ) -> tuple[Array, Array | None, dict[str, Array] | None]:
        normed = self.layer_norm(hidden)
        kv = None
        query_offset: Array | int = 0
        if cache is not None:
            new_k, new_v = self.SelfAttention.project_kv(normed, deterministic)
            start = (0, cache_index, 0, 0)
            cache = {
                "k": jax.lax.dynamic_update_slice(cache["k"], new_k.astype(cache["k"].dtype), start),
                "v": jax.lax.dynamic_update_slice(cache["v"], new_v.astype(cache["v"].dtype), start),
            }
            kv = (cache["k"], cache["v"])
            query_offset = cache_index
        out, position_bias = self.SelfAttention(
            normed, mask, position_bias, kv=kv, deterministic=deterministic, query_offset=query_offset
        )
        return hidden + self.dropout(out, deterministic=deterministic), position_bias, cache


class T5LayerCrossAttention(nn.Module):
    """Pre-norm residual encoder-decoder attention sublayer (no position bias)."""

    config: T5Config
    lora: LoraConfig | None = None

    def setup(self) -> None:
        c = self.config
        self.layer_norm = T5LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype)
        self.EncDecAttention = T5Attention(c, self.lora, has_relative_attention_bias=False)
        self.dropout = Dropout(rate=c.dropout_rate)

    def project_kv(self, encoder_hidden: Array) -> tuple[Array, Array]:
        return self.EncDecAttention.project_kv(encoder_hidden)

    def __call__(
        self,
        hidden: Array,
        mask: Array | None,
        encoder_hidden: Array | None = None,
        kv: tuple[Array, Array] | None = None,
        deterministic: bool = True,
    ) -> Array:
        normed = self.layer_norm(hidden)
        out, _ = self.EncDecAttention(normed, mask, kv_states=encoder_hidden, kv=kv, deterministic=deterministic)
        return hidden + self.dropout(out, deterministic=deterministic)
