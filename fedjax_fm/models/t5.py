"""T5 v1.1 / FLAN-T5 encoder-decoder in Flax linen, faithful to Hugging Face's PyTorch T5.

Usage::

    model = T5(config)                       # or T5(config, lora=LoraConfig(...))
    params = init_params(config, jax.random.PRNGKey(0))
    logits = model.apply({"params": params}, input_ids, attention_mask,
                         decoder_input_ids, decoder_attention_mask)   # [B, T, vocab]

With LoRA adapters (``fedjax_fm.models.lora``) pass ``{"params": params, "lora": adapters}``.
Dropout is active only with ``deterministic=False`` and ``rngs={"dropout": key}``.

The forward pass, per stack (encoder; the decoder adds cross attention)::

    h = dropout(embed(ids))
    for each block:  h = h + dropout(SelfAttn(norm(h)))           # + position bias, mask
                     h = h + dropout(CrossAttn(norm(h), enc))      # decoder only
                     h = h + dropout(FF(norm(h)))
    out = dropout(norm(h))
    logits = out W_lm                    (untied head, T5 v1.1 / FLAN-T5)
           = (out * d_model^-0.5) E^T    (head tied to the embedding E, original T5)

The relative position bias is an embedding [buckets, heads] held by block 0 of each
stack (bidirectional buckets in the encoder, causal in the decoder); block 0 computes
the bias once and the other blocks of its stack reuse it, as in Hugging Face.

Packed rows (several examples per row, T5X/seqio style; ``fedjax_fm.data.packing``)
pass ``encoder_segment_ids`` [B, S] and ``decoder_segment_ids`` [B, T] (1, 2, ... per
example, 0 = padding; each segment contiguous). Attention then stays inside a segment:

    encoder self:  i -> j  iff  seg_e[i] = seg_e[j] > 0
    decoder self:  i -> j  iff  seg_d[i] = seg_d[j] > 0  and  j <= i
    cross:         i -> j  iff  seg_d[i] = seg_e[j] > 0

The relative position bias stays the shared [1, H, Q, K] one computed from row
indices: inside a contiguous segment starting at row index ``s``, the positions are
``p = i - s``, so ``p_j - p_i = j - i`` and the bucket of every pair that may attend is
the one the example would get alone; pairs across segments are masked anyway. So the
cheap batch-shared bias (and its custom-VJP gradient) serves packed rows unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_fm.models.config import LoraConfig, T5Config
from fedjax_fm.models.layers import (
    Dropout,
    LoraDense,
    T5LayerCrossAttention,
    T5LayerFF,
    T5LayerNorm,
    T5LayerSelfAttention,
    normal_init,
)

Array = jax.Array
# Decoding cache: one dict per decoder block with self-attention "k", "v" [B, max_len, H, D]
# and the encoder's projected "cross_k", "cross_v" [B, S, H, D].
DecodeCache = list[dict[str, Array]]


class T5Block(nn.Module):
    """One encoder block (self attention, FF) or decoder block (self, cross attention, FF)."""

    config: T5Config
    lora: LoraConfig | None = None
    has_relative_attention_bias: bool = False
    is_decoder: bool = False

    def setup(self) -> None:
        c = self.config
        layers: list[nn.Module] = [
            T5LayerSelfAttention(c, self.lora, self.has_relative_attention_bias, bidirectional=not self.is_decoder)
        ]
        if self.is_decoder:
            layers.append(T5LayerCrossAttention(c, self.lora))
        layers.append(T5LayerFF(c, self.lora))
        self.layer = layers

    # Positional arguments only, so that nn.remat can mark `deterministic` (index 6,
    # counting self) static.
    def __call__(
        self,
        hidden: Array,
        self_mask: Array | None,
        position_bias: Array | None,
        encoder_hidden: Array | None,
        cross_mask: Array | None,
        deterministic: bool,
    ) -> tuple[Array, Array | None]:
        hidden, position_bias, _ = self.layer[0](hidden, self_mask, position_bias, deterministic)
        if self.is_decoder:
            hidden = self.layer[1](hidden, cross_mask, encoder_hidden, deterministic=deterministic)
        hidden = self.layer[-1](hidden, deterministic)
        return hidden, position_bias

    def cross_kv(self, encoder_hidden: Array) -> tuple[Array, Array]:
        return self.layer[1].project_kv(encoder_hidden)

    def step(
        self,
        hidden: Array,
        self_mask: Array,
        position_bias: Array | None,
        cross_mask: Array | None,
        cache: dict[str, Array],
        cache_index: Array,
    ) -> tuple[Array, Array | None, dict[str, Array]]:
        """One decoding position with the key/value cache (decoder blocks only)."""
        self_cache = {"k": cache["k"], "v": cache["v"]}
        hidden, position_bias, self_cache = self.layer[0](
            hidden, self_mask, position_bias, True, self_cache, cache_index
        )
        hidden = self.layer[1](hidden, cross_mask, kv=(cache["cross_k"], cache["cross_v"]))
        hidden = self.layer[-1](hidden, True)
        return hidden, position_bias, {**cache, **self_cache}


class T5Stack(nn.Module):
    """The encoder or the decoder: blocks, final RMS norm, dropout (embedding is shared)."""

    config: T5Config
    lora: LoraConfig | None = None
    is_decoder: bool = False

    def setup(self) -> None:
        c = self.config
        num_blocks = c.num_decoder_layers if self.is_decoder else c.num_layers
        block_cls = nn.remat(T5Block, static_argnums=(6,)) if c.remat else T5Block
        self.block = [
            block_cls(c, self.lora, has_relative_attention_bias=(i == 0), is_decoder=self.is_decoder)
            for i in range(num_blocks)
        ]
        self.final_layer_norm = T5LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype)
        self.dropout = Dropout(rate=c.dropout_rate)

    def __call__(
        self,
        embeds: Array,
        self_mask: Array | None,
        encoder_hidden: Array | None = None,
        cross_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        hidden = self.dropout(embeds, deterministic=deterministic)
        position_bias = None
        for block in self.block:
            hidden, position_bias = block(hidden, self_mask, position_bias, encoder_hidden, cross_mask, deterministic)
        return self.dropout(self.final_layer_norm(hidden), deterministic=deterministic)

    def cross_kv(self, encoder_hidden: Array) -> list[tuple[Array, Array]]:
        return [block.cross_kv(encoder_hidden) for block in self.block]

    def step(
        self, embeds: Array, self_mask: Array, cross_mask: Array | None, cache: DecodeCache, cache_index: Array
    ) -> tuple[Array, DecodeCache]:
        hidden = embeds
        position_bias = None
        new_cache = []
        for block, block_cache in zip(self.block, cache):
            hidden, position_bias, block_cache = block.step(
                hidden, self_mask, position_bias, cross_mask, block_cache, cache_index
            )
            new_cache.append(block_cache)
        return self.final_layer_norm(hidden), new_cache


def _padding_mask(attention_mask: Array | None) -> Array | None:
    """[B, K] (1 = real token) -> boolean [B, 1, 1, K] for attention logits [B, H, Q, K]."""
    if attention_mask is None:
        return None
    return (attention_mask > 0)[:, None, None, :]


def segment_mask(query_segment_ids: Array, key_segment_ids: Array) -> Array:
    """Segment ids [B, Q], [B, K] (0 = padding) -> boolean [B, 1, Q, K] for logits [B, H, Q, K]:
    ``mask[b, 0, i, j] = (q[b, i] == k[b, j]) and k[b, j] > 0`` (same real segment)."""
    chex.assert_rank([query_segment_ids, key_segment_ids], 2)
    chex.assert_equal_shape_prefix([query_segment_ids, key_segment_ids], 1)
    q = query_segment_ids[:, :, None]
    k = key_segment_ids[:, None, :]
    return ((q == k) & (k > 0))[:, None]


def _and_masks(a: Array | None, b: Array | None) -> Array | None:
    if a is None:
        return b
    return a if b is None else a & b


class T5(nn.Module):
    """FLAN-T5 / T5 v1.1 (or original T5 with ``feed_forward_proj='relu'``, tied head).

    ``__call__(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)``
    returns logits [B, T, vocab] in ``config.dtype``. Masks are int/bool [B, S] and
    [B, T] with 1 = real token; ``None`` means no padding. The decoder also applies the
    causal mask. Packed rows also pass ``encoder_segment_ids`` and
    ``decoder_segment_ids`` (keywords; see the module docstring).
    """

    config: T5Config
    lora: LoraConfig | None = None

    def setup(self) -> None:
        c = self.config
        self.shared = nn.Embed(
            c.vocab_size, c.d_model, embedding_init=normal_init(1.0), dtype=c.dtype, param_dtype=c.param_dtype
        )
        self.encoder = T5Stack(c, self.lora, is_decoder=False)
        self.decoder = T5Stack(c, self.lora, is_decoder=True)
        if not c.tie_word_embeddings:
            self.lm_head = LoraDense(c.vocab_size, normal_init(1.0), c.dtype, c.param_dtype, None)

    def encode(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        deterministic: bool = True,
        segment_ids: Array | None = None,
    ) -> Array:
        """Encoder hidden states [B, S, d_model]; ``segment_ids`` [B, S] for packed rows."""
        chex.assert_rank(input_ids, 2)
        mask = _padding_mask(attention_mask)
        if segment_ids is not None:
            chex.assert_equal_shape([input_ids, segment_ids])
            mask = _and_masks(mask, segment_mask(segment_ids, segment_ids))
        return self.encoder(self.shared(input_ids), mask, deterministic=deterministic)

    def decode(
        self,
        decoder_input_ids: Array,
        encoder_hidden_states: Array,
        attention_mask: Array | None = None,
        decoder_attention_mask: Array | None = None,
        deterministic: bool = True,
        decoder_segment_ids: Array | None = None,
        encoder_segment_ids: Array | None = None,
    ) -> Array:
        """Teacher-forced decoder logits [B, T, vocab]; ``attention_mask`` is the encoder's.

        Packed rows give both ``decoder_segment_ids`` [B, T] and ``encoder_segment_ids``
        [B, S]: self attention is then causal within a segment and cross attention goes
        from decoder segment k to encoder segment k only.
        """
        chex.assert_rank(decoder_input_ids, 2)
        if (decoder_segment_ids is None) != (encoder_segment_ids is None):
            raise ValueError("packed decoding needs both decoder_segment_ids and encoder_segment_ids (or neither)")
        target_len = decoder_input_ids.shape[1]
        self_mask = jnp.tril(jnp.ones((target_len, target_len), dtype=bool))[None, None]
        if decoder_attention_mask is not None:
            self_mask = self_mask & _padding_mask(decoder_attention_mask)
        cross_mask = _padding_mask(attention_mask)
        if decoder_segment_ids is not None:
            chex.assert_equal_shape([decoder_input_ids, decoder_segment_ids])
            self_mask = self_mask & segment_mask(decoder_segment_ids, decoder_segment_ids)
            cross_mask = _and_masks(cross_mask, segment_mask(decoder_segment_ids, encoder_segment_ids))
        hidden = self.decoder(
            self.shared(decoder_input_ids),
            self_mask,
            encoder_hidden_states,
            cross_mask,
            deterministic=deterministic,
        )
        return self._logits(hidden)

    def _logits(self, hidden: Array) -> Array:
        if self.config.tie_word_embeddings:
            # Original T5 rescales before the tied projection (HF: scale_decoder_outputs).
            return self.shared.attend(hidden * (self.config.d_model**-0.5))
        return self.lm_head(hidden)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        decoder_input_ids: Array | None = None,
        decoder_attention_mask: Array | None = None,
        deterministic: bool = True,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
    ) -> Array:
        if decoder_input_ids is None:
            raise ValueError("T5 needs decoder_input_ids (labels shifted right; see models.loss.shift_right)")
        chex.assert_equal_shape_prefix([input_ids, decoder_input_ids], 1)
        encoded = self.encode(input_ids, attention_mask, deterministic, encoder_segment_ids)
        return self.decode(
            decoder_input_ids,
            encoded,
            attention_mask,
            decoder_attention_mask,
            deterministic,
            decoder_segment_ids,
            encoder_segment_ids,
        )

    def init_cache(self, encoder_hidden_states: Array, max_length: int) -> DecodeCache:
        """A decoding cache for up to ``max_length`` decoder positions: empty self-attention
        keys/values and the encoder's keys/values projected once for every block."""
        c = self.config
        batch = encoder_hidden_states.shape[0]
        zeros = jnp.zeros((batch, max_length, c.num_heads, c.d_kv), c.dtype)
        return [
            {"k": zeros, "v": zeros, "cross_k": k, "cross_v": v}
            for k, v in self.decoder.cross_kv(encoder_hidden_states)
        ]

    def decode_step(
        self, token_ids: Array, cache: DecodeCache, cache_index: Array, attention_mask: Array | None = None
    ) -> tuple[Array, DecodeCache]:
        """Logits [B, vocab] for decoder position ``cache_index`` given its input tokens [B]."""
        chex.assert_rank(token_ids, 1)
        max_length = cache[0]["k"].shape[1]
        self_mask = (jnp.arange(max_length) <= cache_index)[None, None, None, :]
        embeds = self.shared(token_ids[:, None])
        hidden, cache = self.decoder.step(embeds, self_mask, _padding_mask(attention_mask), cache, cache_index)
        return self._logits(hidden)[:, 0], cache


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(config: T5Config, rng: Array) -> dict[str, Any]:
    ids = jnp.zeros((1, 1), jnp.int32)
    return T5(config).init(rng, ids, ids, ids, ids)["params"]


def init_params(config: T5Config, rng: Array) -> dict[str, Any]:
    """Random parameters with Hugging Face's T5 initialisation scales (factor 1):

    embedding and untied LM head ~ N(0, 1); q ~ N(0, (d_model d_kv)^-1/2);
    k, v ~ N(0, d_model^-1/2); o ~ N(0, (heads d_kv)^-1/2); wi* ~ N(0, d_model^-1/2);
    wo ~ N(0, d_ff^-1/2); relative bias ~ N(0, d_model^-1/2); norm scales = 1.

    Jit-compiled; ``jax.eval_shape(lambda r: init_params(config, r), rng)`` gives the
    shapes of a large model without allocating it. The tree never holds "lora" variables.
    """
    return _init_params_jit(config, rng)
