"""Analytic FLOP counts of T5 (training step, forward pass, greedy generation).

"Model FLOPs" count the matrix multiplications only -- every dense projection,
the attention score and value products and the LM head -- at 2 FLOPs per
multiply-add (a product of [m, k] and [k, n] costs 2 m k n). Elementwise work
(norms, softmax, GELU, the loss) and embedding gathers are not counted, nor is
recomputation under ``remat``: MFU measures useful work, not work done.

Forward pass, batch B, source length S, target length T, d = d_model,
i = heads * d_kv, f = d_ff, V = vocab, g = 3 if gated (wi_0, wi_1, wo) else 2:

    encoder block:  2BS(4 d i)      q, k, v, o
                  + 2 * 2 B S^2 i   scores q k^T and weights @ v
                  + 2BS(g d f)      feed-forward
    decoder block:  2BT(4 d i) + 4 B T^2 i          self attention
                  + 2BT(2 d i) + 2BS(2 d i)         cross attention q, o on T; k, v on S
                  + 4 B T S i                        cross scores and values
                  + 2BT(g d f)
    LM head:        2 B T d V

Training step = forward + backward. The backward of a product Y = X W needs
dX = dY W^T (same FLOPs as the forward) when X depends on a trainable variable,
and dW = X^T dY (same again) when W is trainable. So full fine-tuning costs
3x the forward. LoRA keeps W frozen (no dW, "≈2x") and adds the adapter
y += (α/r) (x A) B on each targeted projection (m rows): forward 2 m r (in + out),
backward dB, d(xA), dA = 2 m r (2 out + in), plus dx = 2 m r in when x is live.
Gradients are needed only downstream of a trainable variable, which XLA's
dead-code elimination also exploits: with LoRA the embeddings are frozen, so
block 0's q/k/v input gradients are skipped until the first adapter; the count
tracks this "liveness" exactly per projection and per attention operand.

Generation (greedy, key/value cache, N new tokens): the encoder forward once, the
cross-attention k, v once per decoder block (2 B S (2 d i)), then per new token
at position t one decoder position (m = B) whose self attention reads t + 1
cached keys (or the whole static cache with ``attend_full_cache=True``, which
is what a fixed-shape cache computes), cross attention reads S keys, plus the
LM head 2 B d V.
"""

from __future__ import annotations

import dataclasses

from fedjax_fm.models.config import LoraConfig, T5Config


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """FLOPs of one call, split into forward and backward passes.

    ``attention`` is the part of ``total`` spent in the attention core (the score
    products q k^T and the weighted sums of v, forward and backward): the only work
    that grows with the square of a length, and so the part a packed row's segment
    masks waste (``train_step_flops`` of a [rows, S] row against ``ExampleFlops`` of its
    segments). ``scripts/bench_real_lengths.py`` uses it to bound what exact
    block-diagonal attention could save.
    """

    forward: int
    backward: int = 0
    attention: int = 0

    @property
    def total(self) -> int:
        return self.forward + self.backward


class _Counter:
    """Accumulates FLOPs while walking the model's matmuls in execution order."""

    def __init__(self, training: bool, lora: LoraConfig | None):
        self.training = training
        self.lora = lora
        self.full = training and lora is None  # full fine-tuning: every weight trainable
        self.forward = 0
        self.backward = 0
        self.attention_flops = 0  # the attention core's share of forward + backward

    def dense(self, rows: int, d_in: int, d_out: int, module: str, x_live: bool, adapted: bool = True) -> bool:
        """y = x W for ``rows`` rows; returns whether y depends on a trainable variable."""
        flops = 2 * rows * d_in * d_out
        self.forward += flops
        has_adapter = adapted and self.lora is not None and module in self.lora.target_modules
        if has_adapter:
            r = self.lora.rank
            self.forward += 2 * rows * r * (d_in + d_out)
        if not self.training:
            return False
        if self.full:
            self.backward += flops  # dW
        if x_live:
            self.backward += flops  # dX through W
        if has_adapter:
            r = self.lora.rank
            self.backward += 2 * rows * r * (2 * d_out + d_in)  # dB, d(xA), dA
            if x_live:
                self.backward += 2 * rows * r * d_in  # dX through A
        return self.full or x_live or has_adapter

    def attention(self, batch: int, heads: int, q_len: int, k_len: int, d_kv: int,
                  q_live: bool, k_live: bool, v_live: bool) -> bool:
        """softmax(q k^T) v; returns whether the output is live."""
        one = 2 * batch * heads * q_len * k_len * d_kv
        before = self.forward + self.backward
        self.forward += 2 * one
        if self.training:
            self.backward += one * (int(q_live) + int(k_live))  # dQ, dK of the scores
            self.backward += one * (int(q_live or k_live) + int(v_live))  # dP, dV of the values
        self.attention_flops += self.forward + self.backward - before
        return q_live or k_live or v_live

    def feed_forward(self, config: T5Config, rows: int, x_live: bool) -> bool:
        d, f = config.d_model, config.d_ff
        if config.is_gated:
            gate = self.dense(rows, d, f, "wi_0", x_live)
            linear = self.dense(rows, d, f, "wi_1", x_live)
            hidden_live = gate or linear
        else:
            hidden_live = self.dense(rows, d, f, "wi", x_live)
        return self.dense(rows, f, d, "wo", hidden_live)

    def self_attention(self, config: T5Config, batch: int, q_len: int, k_len: int, x_live: bool) -> bool:
        d, i = config.d_model, config.inner_dim
        rows = batch * q_len
        q = self.dense(rows, d, i, "q", x_live)
        k = self.dense(rows, d, i, "k", x_live)
        v = self.dense(rows, d, i, "v", x_live)
        out = self.attention(batch, config.num_heads, q_len, k_len, config.d_kv, q, k, v)
        return self.dense(rows, i, d, "o", out)


def _check_shape_args(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _encoder_decoder(counter: _Counter, config: T5Config, batch: int, source_len: int, target_len: int) -> None:
    d, i = config.d_model, config.inner_dim
    live = counter.full  # the embeddings are trainable only in full fine-tuning
    for _ in range(config.num_layers):
        live = counter.self_attention(config, batch, source_len, source_len, live) or live
        live = counter.feed_forward(config, batch * source_len, live) or live
    encoder_live = live
    live = counter.full
    rows = batch * target_len
    for _ in range(config.num_decoder_layers):
        live = counter.self_attention(config, batch, target_len, target_len, live) or live
        q = counter.dense(rows, d, i, "q", live)
        k = counter.dense(batch * source_len, d, i, "k", encoder_live)
        v = counter.dense(batch * source_len, d, i, "v", encoder_live)
        out = counter.attention(batch, config.num_heads, target_len, source_len, config.d_kv, q, k, v)
        live = counter.dense(rows, i, d, "o", out) or live
        live = counter.feed_forward(config, rows, live) or live
    counter.dense(rows, d, config.vocab_size, "lm_head", live, adapted=False)


def forward_flops(config: T5Config, batch_size: int, source_len: int, target_len: int,
                  lora: LoraConfig | None = None) -> int:
    """Matmul FLOPs of one teacher-forced forward pass (adapter products included with ``lora``)."""
    _check_shape_args(batch_size=batch_size, source_len=source_len, target_len=target_len)
    counter = _Counter(training=False, lora=lora)
    _encoder_decoder(counter, config, batch_size, source_len, target_len)
    return counter.forward


def train_step_flops(config: T5Config, batch_size: int, source_len: int, target_len: int,
                     lora: LoraConfig | None = None) -> FlopCount:
    """Matmul FLOPs of one training step (forward + backward) on a [B, S] -> [B, T] batch.

    ``lora=None``: full fine-tuning (all weights trainable, ~3x forward). With a
    ``LoraConfig``: adapters on ``lora.target_modules`` in every attention (self and
    cross, encoder and decoder) and feed-forward projection of that name, as PEFT
    matches module names; base weights frozen, no weight gradients for them.
    """
    _check_shape_args(batch_size=batch_size, source_len=source_len, target_len=target_len)
    counter = _Counter(training=True, lora=lora)
    _encoder_decoder(counter, config, batch_size, source_len, target_len)
    return FlopCount(counter.forward, counter.backward, counter.attention_flops)


def decode_step_flops(config: T5Config, batch_size: int, source_len: int, keys: int,
                      lora: LoraConfig | None = None) -> int:
    """Matmul FLOPs of one cached decoder position whose self attention reads ``keys``
    cached keys (cross-attention keys/values already projected), LM head included."""
    _check_shape_args(batch_size=batch_size, source_len=source_len, keys=keys)
    counter = _Counter(training=False, lora=lora)
    d, i, b = config.d_model, config.inner_dim, batch_size
    for _ in range(config.num_decoder_layers):
        for module in ("q", "k", "v"):
            counter.dense(b, d, i, module, False)
        counter.attention(b, config.num_heads, 1, keys, config.d_kv, False, False, False)
        counter.dense(b, i, d, "o", False)
        counter.dense(b, d, i, "q", False)
        counter.attention(b, config.num_heads, 1, source_len, config.d_kv, False, False, False)
        counter.dense(b, i, d, "o", False)
        counter.feed_forward(config, b, False)
    counter.dense(b, d, config.vocab_size, "lm_head", False, adapted=False)
    return counter.forward


def encode_flops(config: T5Config, batch_size: int, source_len: int, lora: LoraConfig | None = None) -> int:
    """Matmul FLOPs of the encoder forward pass on a [B, S] batch."""
    _check_shape_args(batch_size=batch_size, source_len=source_len)
    counter = _Counter(training=False, lora=lora)
    for _ in range(config.num_layers):
        counter.self_attention(config, batch_size, source_len, source_len, False)
        counter.feed_forward(config, batch_size * source_len, False)
    return counter.forward


def generation_flops(config: T5Config, batch_size: int, source_len: int, max_new_tokens: int,
                     lora: LoraConfig | None = None, attend_full_cache: bool = False, num_beams: int = 1) -> int:
    """Matmul FLOPs of generating ``max_new_tokens`` tokens with a key/value cache:
    greedy (``num_beams=1``) or beam search, whose decoder runs on ``batch_size *
    num_beams`` rows (``fedjax_fm.models.generate``; the encoder runs on
    ``batch_size``, the cross-attention keys/values are projected for every beam).

    Counts every step (no early stop). ``attend_full_cache=False`` counts the t + 1
    keys a causal step needs; ``True`` the whole static cache a fixed-shape
    implementation multiplies by (masked), i.e. the work the hardware does.
    """
    _check_shape_args(batch_size=batch_size, source_len=source_len, max_new_tokens=max_new_tokens,
                      num_beams=num_beams)
    rows = batch_size * num_beams
    counter = _Counter(training=False, lora=lora)
    for _ in range(config.num_decoder_layers):  # cross-attention keys/values, once
        counter.dense(rows * source_len, config.d_model, config.inner_dim, "k", False)
        counter.dense(rows * source_len, config.d_model, config.inner_dim, "v", False)
    steps = sum(
        decode_step_flops(config, rows, source_len, max_new_tokens if attend_full_cache else t + 1, lora)
        for t in range(max_new_tokens)
    )
    return encode_flops(config, batch_size, source_len, lora) + counter.forward + steps


class ExampleFlops:
    """Useful training FLOPs of real examples, each counted at its own lengths.

    ``ExampleFlops(config, lora)(source_lengths, target_lengths)`` =
    ``Σ_i train_step_flops(config, 1, s_i, t_i).total``: the work the examples need
    alone (attention quadratic in each example's own length), which is what a packed
    row's segment-masked attention computes usefully and what MFU counts (PaLM's
    definition: model FLOPs of the real tokens, not of padding). Counts are cached per
    ``(s, t)`` pair, so a round's examples cost a dictionary look-up each.
    """

    def __init__(self, config: T5Config, lora: LoraConfig | None = None):
        self.config, self.lora = config, lora
        self._cache: dict[tuple[int, int], FlopCount] = {}

    def count(self, source_len: int, target_len: int) -> FlopCount:
        """``train_step_flops`` of one example alone at these lengths (cached)."""
        key = (int(source_len), int(target_len))
        if key not in self._cache:
            self._cache[key] = train_step_flops(self.config, 1, key[0], key[1], lora=self.lora)
        return self._cache[key]

    def one(self, source_len: int, target_len: int) -> int:
        return self.count(source_len, target_len).total

    def __call__(self, source_lengths, target_lengths) -> int:
        return int(sum(self.one(s, t) for s, t in zip(source_lengths, target_lengths) if s > 0 and t > 0))

    def attention(self, source_lengths, target_lengths) -> int:
        """The attention core's part of ``self(source_lengths, target_lengths)``: the
        least attention work any exact scheme does (block-diagonal over segments)."""
        return int(sum(self.count(s, t).attention for s, t in zip(source_lengths, target_lengths) if s > 0 and t > 0))
