"""Update codecs: what a client sends instead of its float32 delta, and its exact size.

A :class:`Codec` is three pure, jit- and vmap-able functions (optax's habit of
small ``init`` / ``update`` pairs)::

    state            = codec.init(delta_template)        # arrays or ShapeDtypeStructs
    payload, state'  = codec.encode(delta, state, rng)
    delta_hat        = codec.decode(payload)

The **payload** is a pytree whose *leaves* are exactly the arrays that travel
(packed ``uint8`` codes, ``float32`` scales, ``int32`` indices, ``uint32`` seeds)
and whose *tree structure* carries the static facts the decoder needs (original
shape and dtype, bits, block size). Both ends know those facts from the model and
the configuration, so they cost no bytes per round; the decoder needs nothing but
the payload. ``fl.tree_nbytes(payload)`` = Σ size · itemsize over the leaves,
exactly (on a payload stacked over clients by ``vmap``: the total for all of them).

Codecs act on floating-point leaves and pass any other leaf through unchanged,
which is what makes :func:`chain` simple: ``chain(topk(0.01), quantize(8))``
quantises top-k's values and leaves its ``int32`` indices alone.

Codecs (all unbiased or exact unless noted):

* :func:`identity` (``none``) and :func:`bf16` (transport in bfloat16; relative
  error ≤ 2⁻⁸ per element, round-to-nearest-even, biased by at most that).
* :func:`quantize`: stochastic uniform quantisation to ``b`` bits per block of
  the flattened tensor, optional randomised Hadamard rotation first; codes of
  ``b < 8`` bits packed several to a byte (see :func:`quantize` for the maths).
* :func:`topk`: the ``k = ⌈fraction · size⌉`` largest-magnitude entries per
  tensor, with error feedback (the residual is codec state, one per client).
* :func:`ffa_lora`: sends only the LoRA ``B`` leaves (FFA-LoRA, Sun et al. 2024);
  pair it with :func:`freeze_lora_a` on the client optimiser.
* :func:`chain` composes them; :func:`make_codec` builds one from a config dict.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_fm.fl.variables import tree_nbytes

Params = Any
Payload = Any
CodecState = Any

# Leaf names of a LoRA ``A`` matrix: ``lora_A`` in fedjax_fm.models.lora, plus the
# spellings of other adapter trees (case-insensitive).
LORA_A_NAMES = ("lora_a", "a")
MAX_QUANTIZE_BITS = 16  # codes are built in float32 (24-bit mantissa); 32 means "no quantisation"


class Codec(NamedTuple):
    """``init(template) -> state``, ``encode(delta, state, rng) -> (payload, state)``, ``decode(payload) -> delta``."""

    init: Callable[[Params], CodecState]
    encode: Callable[[Params, CodecState, jax.Array], tuple[Payload, CodecState]]
    decode: Callable[[Payload], Params]


# ----------------------------------------------------------------- payload nodes
# flax.struct dataclasses: array fields are leaves (they travel), pytree_node=False
# fields are static tree metadata (known to both ends, never sent).


@flax.struct.dataclass
class Cast:
    """A leaf sent in a narrower float dtype; decoded back to ``dtype``."""

    value: jax.Array
    dtype: str = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Quantized:
    """A leaf as ``bits``-bit codes per block: ``value ≈ low + code · step`` (then un-rotated).

    ``packed``: uint8 codes, little-endian bit stream (code ``i`` at bits
    ``[i·bits, (i+1)·bits)``). ``low``, ``step``: float32 ``[blocks]``. ``seed``:
    uint32 ``[]`` from which the decoder regenerates the rotation's signs, or
    ``None`` (no leaf) without rotation.
    """

    packed: jax.Array
    low: jax.Array
    step: jax.Array
    seed: jax.Array | None
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)
    bits: int = flax.struct.field(pytree_node=False)
    block_size: int = flax.struct.field(pytree_node=False)  # block length before any rotation padding


@flax.struct.dataclass
class Sparse:
    """``k`` entries of a flattened leaf: ``values`` and their ``int32`` ``indices``."""

    values: jax.Array
    indices: jax.Array
    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class Dropped:
    """A leaf that is not sent (no array leaves, 0 bytes); decoded as zeros."""

    shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
    dtype: str = flax.struct.field(pytree_node=False)


# ------------------------------------------------------------------ tree helpers


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _map_float_leaves(fn: Callable[[jax.Array, jax.Array], Any], tree: Params, rng: jax.Array) -> Params:
    """``fn(leaf, key_i)`` on floating leaves (key folded from the leaf's index); others pass through."""
    leaves, treedef = jax.tree.flatten(tree)
    out = [fn(x, jax.random.fold_in(rng, i)) if _is_float(x) else x for i, x in enumerate(leaves)]
    return jax.tree.unflatten(treedef, out)


def _decode_nodes(node_type: type, fn: Callable[[Any], jax.Array], payload: Payload) -> Params:
    """Replaces every ``node_type`` node of ``payload`` by ``fn(node)``; other leaves pass through."""
    is_node = lambda x: isinstance(x, node_type)  # noqa: E731
    return jax.tree.map(lambda x: fn(x) if is_node(x) else x, payload, is_leaf=is_node)


def _no_state(template: Params) -> tuple:
    del template
    return ()


# ------------------------------------------------------------- identity and bf16


def identity() -> Codec:
    """Sends the delta as it is (float32 for the deltas of this project)."""
    return Codec(init=_no_state, encode=lambda delta, state, rng: (delta, state), decode=lambda payload: payload)


def bf16() -> Codec:
    """bfloat16 transport: ``|decode(encode(x)) − x| ≤ 2⁻⁸ |x|`` per element.

    bfloat16 keeps 8 significant bits and rounds to nearest even (unit roundoff
    2⁻⁸); its exponent range is float32's, so nothing overflows.
    """

    def encode(delta: Params, state: tuple, rng: jax.Array) -> tuple[Payload, tuple]:
        cast = lambda x, key: Cast(x.astype(jnp.bfloat16), jnp.dtype(x.dtype).name)  # noqa: E731
        return _map_float_leaves(cast, delta, rng), state

    def decode(payload: Payload) -> Params:
        return _decode_nodes(Cast, lambda node: node.value.astype(node.dtype), payload)

    return Codec(init=_no_state, encode=encode, decode=decode)


# ---------------------------------------------------------------- bit packing


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
    """``[n]`` unsigned codes ``< 2**bits`` -> ``uint8[⌈n·bits/8⌉]``, little-endian bit stream.

    When ``bits`` divides 8 the codes are shifted into bytes directly (no
    ``n·bits`` temporary); the layout is the same as the general bit stream.
    """
    chex.assert_rank(codes, 1)
    codes = codes.astype(jnp.uint32)
    n = codes.shape[0]
    if 8 % bits == 0:
        per_byte = 8 // bits
        m = -(-n // per_byte)
        grouped = jnp.pad(codes, (0, m * per_byte - n)).reshape(m, per_byte)
        shifts = jnp.arange(per_byte, dtype=jnp.uint32) * bits
        return jnp.sum(grouped << shifts, axis=1).astype(jnp.uint8)  # disjoint bits: sum == or
    stream = ((codes[:, None] >> jnp.arange(bits, dtype=jnp.uint32)) & 1).reshape(-1)
    m = -(-stream.shape[0] // 8)
    stream = jnp.pad(stream, (0, m * 8 - stream.shape[0])).reshape(m, 8)
    return jnp.sum(stream << jnp.arange(8, dtype=jnp.uint32), axis=1).astype(jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack_bits`: ``uint32[n]`` codes."""
    chex.assert_rank(packed, 1)
    packed = packed.astype(jnp.uint32)
    mask = jnp.uint32((1 << bits) - 1)
    if 8 % bits == 0:
        shifts = jnp.arange(8 // bits, dtype=jnp.uint32) * bits
        return ((packed[:, None] >> shifts) & mask).reshape(-1)[:n]
    stream = ((packed[:, None] >> jnp.arange(8, dtype=jnp.uint32)) & 1).reshape(-1)[: n * bits]
    weights = jnp.uint32(1) << jnp.arange(bits, dtype=jnp.uint32)
    return jnp.sum(stream.reshape(n, bits) * weights, axis=1).astype(jnp.uint32)


# ----------------------------------------------------------- Hadamard rotation


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def hadamard_transform(x: jax.Array) -> jax.Array:
    """Orthonormal Walsh–Hadamard transform ``x H / √P`` over the last axis (length ``P = 2^m``).

    Sylvester's ``H`` is symmetric with ``H H = P I``, so this map is its own inverse.
    O(P log P) butterflies instead of a ``P × P`` matmul.
    """
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"hadamard_transform needs a power-of-two length, got {p}")
    lead = x.shape[:-1]
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, p)
        h *= 2
    return x / jnp.sqrt(jnp.asarray(p, x.dtype))


def _rotation_signs(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.rademacher(jax.random.PRNGKey(seed), shape, jnp.float32)


# ------------------------------------------------------------------ quantiser


def _to_blocks(flat: jax.Array, block: int, width: int) -> jax.Array:
    """``[n]`` -> ``[blocks, width]``: blocks of ``block`` values, then zero padded to ``width``.

    The last block is padded with its own last value, so the padding cannot
    widen that block's [min, max] range (unrotated, it is never sent either).
    """
    n = flat.shape[0]
    blocks = -(-n // block)
    rows = jnp.pad(flat, (0, blocks * block - n), mode="edge").reshape(blocks, block)
    return jnp.pad(rows, ((0, 0), (0, width - block)))


def _stochastic_codes(y: jax.Array, levels: int, rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row: ``low = min``, ``step = (max − min)/levels``, codes ``⌊(y − low)/step + U[0,1)⌋``."""
    low = jnp.min(y, axis=1)
    step = (jnp.max(y, axis=1) - low) / levels
    safe = jnp.where(step > 0, step, 1.0)  # a constant block has step 0: every code is 0, decoded exactly
    t = jnp.where(step[:, None] > 0, (y - low[:, None]) / safe[:, None], 0.0)
    codes = jnp.floor(t + jax.random.uniform(rng, y.shape, jnp.float32))
    return jnp.clip(codes, 0, levels).astype(jnp.uint32), low, step


def _quantize_leaf(x: jax.Array, rng: jax.Array, bits: int, block_size: int | None, rotate: bool) -> Quantized:
    n = int(x.size)
    if n == 0:
        raise ValueError("quantize: cannot encode an empty array")
    block = min(block_size or n, n)
    width = _next_pow2(block) if rotate else block
    y = _to_blocks(x.reshape(-1).astype(jnp.float32), block, width)
    seed = None
    if rotate:
        rng, sign_key = jax.random.split(rng)
        seed = jax.random.bits(sign_key, (), jnp.uint32)
        y = hadamard_transform(y * _rotation_signs(seed, y.shape))
    codes, low, step = _stochastic_codes(y, (1 << bits) - 1, rng)
    # Unrotated padding is never sent (the decoder re-pads); rotated blocks are
    # dense, so all blocks · width coefficients travel.
    sent = codes.reshape(-1) if rotate else codes.reshape(-1)[:n]
    return Quantized(pack_bits(sent, bits), low, step, seed, tuple(x.shape), jnp.dtype(x.dtype).name, bits, block)


def _dequantize_leaf(node: Quantized) -> jax.Array:
    n = math.prod(node.shape)
    blocks = node.low.shape[-1]
    rotate = node.seed is not None
    width = _next_pow2(node.block_size) if rotate else node.block_size
    count = blocks * width if rotate else n
    codes = unpack_bits(node.packed, node.bits, count).astype(jnp.float32)
    if not rotate:
        codes = jnp.pad(codes, (0, blocks * width - n))
    y = node.low[:, None] + codes.reshape(blocks, width) * node.step[:, None]
    if rotate:
        # Inverse of y = H (D x) / √P is x = D (H y) / √P (H symmetric, H H = P I, D D = I).
        y = hadamard_transform(y) * _rotation_signs(node.seed, y.shape)
        y = y[:, : node.block_size]
    return y.reshape(-1)[:n].reshape(node.shape).astype(node.dtype)


def quantize(bits: int = 8, block_size: int | None = None, rotation: str = "none") -> Codec:
    """Unbiased stochastic uniform quantisation (QSGD-style with min/max scaling).

    Each floating leaf is flattened and cut into blocks of ``block_size`` values
    (``None``: the whole tensor is one block). With ``rotation="hadamard"`` each
    block ``x`` (zero padded to ``P = 2^⌈log₂ block⌉``) is first rotated,
    ``y = H D x / √P``, with ``D`` a diagonal of random ±1 signs; otherwise ``y = x``.
    Per block, with ``s = 2^bits − 1`` levels, ``low = min y``, ``step = (max y − low)/s``
    and ``t_j = (y_j − low)/step ∈ [0, s]``, each coordinate is sent as the code

        q_j = ⌊t_j⌋ + Bernoulli(t_j − ⌊t_j⌋)      (stochastic rounding: ⌊t_j + U[0,1)⌋)

    and decoded as ``ŷ_j = low + q_j · step`` (then ``x̂ = D H ŷ / √P`` when rotated).

    * **Unbiased**: ``E[q_j] = t_j``, so ``E[ŷ] = y`` and, the rotation being linear,
      ``E[x̂] = x`` (conditionally on the signs, hence also over them).
    * **Variance**: ``Var ŷ_j = step² p(1 − p) ≤ step²/4 = (max − min)²/(4 s²)``.
      Rotated, ``x̂_i − x_i = Σ_j ±(ŷ_j − y_j)/√P`` with independent terms, so the
      same bound ``(max y − min y)²/(4 s²)`` holds per coordinate of ``x̂``.
    * **Error bound** (every draw): unrotated ``|x̂_i − x_i| ≤ step = (max − min)/s``;
      rotated ``‖x̂ − x‖₂ = ‖ŷ − y‖₂ ≤ √P · step`` per block (the rotation is orthonormal).

    Rotation spreads an outlier over the block, shrinking ``max − min`` for
    heavy-tailed deltas. The decoder regenerates ``D`` from a ``uint32`` seed that
    travels in the payload (4 bytes per leaf, counted), drawn from ``encode``'s rng.

    Bytes per leaf of ``n`` values in ``m`` blocks: ``⌈n·bits/8⌉ + 8m`` unrotated
    (codes packed ``8/bits`` to a byte; the last block's padding is not sent);
    ``⌈m·P·bits/8⌉ + 8m + 4`` rotated. ``bits=32`` is the identity codec.
    """
    _check_bits(bits)
    _check_block_size(block_size)
    _check_choice("rotation", rotation, ("none", "hadamard"))
    if bits == 32:
        return identity()
    rotate = rotation == "hadamard"

    def encode(delta: Params, state: tuple, rng: jax.Array) -> tuple[Payload, tuple]:
        chex.assert_shape(rng, (2,))  # a raw PRNGKey: the rounding draws (and rotation seed) come from it
        leaf = lambda x, key: _quantize_leaf(x, key, bits, block_size, rotate)  # noqa: E731
        return _map_float_leaves(leaf, delta, rng), state

    def decode(payload: Payload) -> Params:
        return _decode_nodes(Quantized, _dequantize_leaf, payload)

    return Codec(init=_no_state, encode=encode, decode=decode)


# -------------------------------------------------------------------- top-k


def topk_count(fraction: float, size: int) -> int:
    """``k = ⌈fraction · size⌉`` (at least 1), computed exactly for decimal fractions like 0.01."""
    return max(1, min(size, math.ceil(Fraction(repr(float(fraction))) * size)))


def _topk_leaf(c: jax.Array, fraction: float, dtype: str) -> Sparse:
    flat = c.reshape(-1)
    _, indices = jax.lax.top_k(jnp.abs(flat), topk_count(fraction, flat.shape[0]))
    return Sparse(flat[indices].astype(dtype), indices.astype(jnp.int32), tuple(c.shape), dtype)


def _densify(node: Sparse) -> jax.Array:
    flat = jnp.zeros((math.prod(node.shape),), node.dtype)
    return flat.at[node.indices].set(node.values.astype(node.dtype)).reshape(node.shape)


def topk(fraction: float, error_feedback: bool = True) -> Codec:
    """Per-tensor top-k sparsification with optional error feedback (Stich et al. 2018; Seide et al. 2014).

    For each floating leaf, ``k = ⌈fraction · size⌉`` entries of largest magnitude
    travel as ``values`` (the delta's dtype) and ``int32`` ``indices``: ``k·(4 + 4)``
    bytes for float32. Biased on its own; error feedback makes it converge.

    **Error feedback.** The state is a float32 residual ``r`` per leaf (``r₀ = 0``),
    one per client, kept by the caller across rounds (a plain pytree: stack it over
    the population and checkpoint it). Round ``t`` sends ``s_t = topk(c_t)`` of
    ``c_t = δ_t + r_{t−1}`` and keeps ``r_t = c_t − s_t``, hence ``s_t + r_t = δ_t + r_{t−1}``
    and, telescoping, ``Σ_{t≤T} s_t + r_T = Σ_{t≤T} δ_t``: nothing is lost, only
    delayed. In a :func:`chain` the residual is taken against top-k's output, not
    against a later quantiser's (whose error is unbiased noise, not fed back).
    """
    _check_fraction(fraction)

    def init(template: Params) -> Params | tuple:
        if not error_feedback:
            return ()
        return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), template)

    def encode(delta: Params, state: Params | tuple, rng: jax.Array) -> tuple[Payload, Params | tuple]:
        del rng
        if not error_feedback:
            sparse = lambda x: _topk_leaf(x, fraction, jnp.dtype(x.dtype).name) if _is_float(x) else x  # noqa: E731
            return jax.tree.map(sparse, delta), state
        chex.assert_trees_all_equal_shapes(delta, state)
        corrected = jax.tree.map(lambda d, r: d.astype(jnp.float32) + r, delta, state)
        payload = jax.tree.map(lambda c, d: _topk_leaf(c, fraction, jnp.dtype(d.dtype).name), corrected, delta)
        is_sparse = lambda x: isinstance(x, Sparse)  # noqa: E731
        sent = jax.tree.map(lambda node: _densify(node).astype(jnp.float32), payload, is_leaf=is_sparse)
        return payload, jax.tree.map(jnp.subtract, corrected, sent)

    def decode(payload: Payload) -> Params:
        return _decode_nodes(Sparse, _densify, payload)

    return Codec(init=init, encode=encode, decode=decode)


# --------------------------------------------------------------------- FFA-LoRA


def _leaf_name(path: tuple) -> str:
    last = path[-1] if path else None
    return str(getattr(last, "key", getattr(last, "name", last)))


def is_lora_a(path: tuple, names: Sequence[str] = LORA_A_NAMES) -> bool:
    """Whether a ``tree_map_with_path`` path ends in a LoRA ``A`` leaf (``lora_A``, ``lora_a``, ``a``)."""
    return _leaf_name(path).lower() in {n.lower() for n in names}


def lora_a_mask(tree: Params, names: Sequence[str] = LORA_A_NAMES) -> Params:
    """A bool pytree like ``tree``: True on LoRA ``A`` leaves. Raises if there is none."""
    mask = jax.tree_util.tree_map_with_path(lambda path, _: is_lora_a(path, names), tree)
    if not any(jax.tree.leaves(mask)):
        raise ValueError(
            f"FFA-LoRA: no LoRA A leaf (named one of {sorted(names)}) in the tree; is it a LoRA adapter tree?"
        )
    return mask


def freeze_lora_a(optimizer: optax.GradientTransformation, names: Sequence[str] = LORA_A_NAMES
                  ) -> optax.GradientTransformation:
    """FFA-LoRA's optimiser: ``optimizer`` on every leaf but LoRA ``A``, whose update is exactly 0.

    ``optax.multi_transform`` routes ``A`` to ``optax.set_to_zero()``, so no term of
    ``optimizer`` (momentum, decoupled weight decay) ever reaches ``A`` and it keeps
    no optimiser state for it. Use it for the client optimiser; with a server
    optimiser that decays weights (``fedadamw``) wrap that one too, or ``A`` drifts.
    """

    def labels(params: Params) -> Params:
        mask = lora_a_mask(params, names)
        return jax.tree.map(lambda frozen: "frozen" if frozen else "trained", mask)

    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def ffa_lora(names: Sequence[str] = LORA_A_NAMES) -> Codec:
    """Sends only the LoRA ``B`` leaves (and any non-adapter leaves); ``A``'s delta decodes as zeros.

    Correct only together with :func:`freeze_lora_a` on the client (then ``A``'s
    delta *is* zero and the codec is lossless); without it the clients' changes
    to ``A`` are silently dropped. Chain it with a quantiser for FFA + 8-bit.
    """
    names = tuple(names)

    def encode(delta: Params, state: tuple, rng: jax.Array) -> tuple[Payload, tuple]:
        del rng
        mask = lora_a_mask(delta, names)
        drop = lambda frozen, x: Dropped(tuple(x.shape), jnp.dtype(x.dtype).name) if frozen else x  # noqa: E731
        return jax.tree.map(drop, mask, delta), state

    def decode(payload: Payload) -> Params:
        return _decode_nodes(Dropped, lambda node: jnp.zeros(node.shape, node.dtype), payload)

    return Codec(init=_no_state, encode=encode, decode=decode)


# -------------------------------------------------------------------- chain


def chain(*codecs: Codec) -> Codec:
    """Applies ``codecs`` in order: each encodes the previous one's payload; decoding runs backwards.

    ``chain(topk(0.01), quantize(8))`` sends 8-bit values and int32 indices;
    ``chain(ffa_lora(), quantize(8))`` sends 8-bit B leaves. The state is the tuple
    of the parts' states; each part draws from its own ``fold_in(rng, i)``.

    Order matters: drop or sparsify first, quantise last. A codec after
    ``quantize`` would treat its float32 scales as data (and ``topk`` its codes).
    """
    if not codecs:
        raise ValueError("chain needs at least one codec")

    def init(template: Params) -> tuple:
        states = []
        for codec in codecs:
            state = codec.init(template)
            states.append(state)
            # The next codec sees this one's payload: its shapes, without running it.
            template = jax.eval_shape(codec.encode, template, state, jax.random.PRNGKey(0))[0]
        return tuple(states)

    def encode(delta: Params, state: tuple, rng: jax.Array) -> tuple[Payload, tuple]:
        chex.assert_equal(len(state), len(codecs))
        new_states = []
        for i, (codec, part_state) in enumerate(zip(codecs, state)):
            delta, part_state = codec.encode(delta, part_state, jax.random.fold_in(rng, i))
            new_states.append(part_state)
        return delta, tuple(new_states)

    def decode(payload: Payload) -> Params:
        for codec in reversed(codecs):
            payload = codec.decode(payload)
        return payload

    return Codec(init=init, encode=encode, decode=decode)


# ------------------------------------------------------- bytes, round trip, state


def encoded_bytes(codec: Codec, template: Params) -> int:
    """Exact payload bytes of ``codec`` for deltas shaped like ``template``, without running it.

    Payload sizes depend on shapes only (top-k's ``k`` and the block counts are
    static), so this is the bytes of every encode of such a delta.
    """
    state = codec.init(template)
    payload = jax.eval_shape(codec.encode, template, state, jax.random.PRNGKey(0))[0]
    return tree_nbytes(payload)


def downlink_bytes(params: Params, codec: Codec | None = None) -> int:
    """Exact bytes of one model broadcast: the trainable ``params`` as they are, or ``codec``'s payload of them.

    With LoRA the broadcast is the adapters only (the frozen base ships once,
    before training). A downlink ``codec`` (e.g. ``bf16()`` or ``quantize(8)``)
    is optional; for a stateful codec the state lives on the server.
    """
    return tree_nbytes(params) if codec is None else encoded_bytes(codec, params)


def roundtrip(codec: Codec, delta: Params, state: CodecState, rng: jax.Array) -> tuple[Params, CodecState, Payload]:
    """``decode(encode(delta))`` with the new state and the payload (for its bytes); pure, jit/vmap-able."""
    chex.assert_shape(rng, (2,))
    payload, new_state = codec.encode(delta, state, rng)
    return codec.decode(payload), new_state, payload


def init_client_states(codec: Codec, template: Params, num_clients: int) -> CodecState:
    """Codec states for a population, stacked on a leading ``[num_clients]`` axis (one pytree to checkpoint)."""
    state = codec.init(template)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), state)


def take_client_states(states: CodecState, client_ids: jax.Array) -> CodecState:
    """The states of ``client_ids`` (``[K]``), stacked for a vmapped encode."""
    return jax.tree.map(lambda x: x[client_ids], states)


def put_client_states(states: CodecState, client_ids: jax.Array, new: CodecState) -> CodecState:
    """``states`` with the rows of ``client_ids`` replaced by ``new`` (functional update)."""
    return jax.tree.map(lambda x, y: x.at[client_ids].set(y), states, new)


# --------------------------------------------------------------- from a config


_PREFIX = "federated.compression"
_SPEC_KEYS: dict[str, tuple[str, ...]] = {
    "none": (),
    "bf16": (),
    "quantize": ("bits", "block_size", "rotation"),
    "topk": ("fraction", "error_feedback"),
    "ffa_lora": (),
    "chain": ("codecs",),
}
CODEC_NAMES = tuple(_SPEC_KEYS)


def _spec_error(key: str, message: str, prefix: str = _PREFIX) -> ValueError:
    return ValueError(f"{prefix}.{key}: {message}")


def _check_bits(bits: Any, prefix: str = _PREFIX) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not (
        1 <= bits <= MAX_QUANTIZE_BITS or bits == 32
    ):
        raise _spec_error("bits", f"must be an integer in 1..{MAX_QUANTIZE_BITS} (8, 4, 2 typical) "
                                  f"or 32 (no quantisation), got {bits!r}", prefix)


def _check_block_size(block_size: Any, prefix: str = _PREFIX) -> None:
    if block_size is not None and (
        isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1
    ):
        raise _spec_error("block_size", f"must be a positive integer or null (whole tensor), got {block_size!r}",
                          prefix)


def _check_fraction(fraction: Any, prefix: str = _PREFIX) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise _spec_error("fraction", f"must be a number in (0, 1], got {fraction!r}", prefix)


def _check_choice(key: str, value: Any, valid: Sequence[str], prefix: str = _PREFIX) -> None:
    if value not in valid:
        raise _spec_error(key, f"must be one of {', '.join(valid)}; got {value!r}", prefix)


def make_codec(spec: Mapping[str, Any] | None, prefix: str = _PREFIX) -> Codec:
    """A codec from a config dict; ``None`` or ``{"name": "none"}`` is the identity.

    Examples: ``{"name": "bf16"}``, ``{"name": "quantize", "bits": 4, "block_size": 256,
    "rotation": "hadamard"}``, ``{"name": "topk", "fraction": 0.01, "error_feedback": True}``,
    ``{"name": "ffa_lora"}``, ``{"name": "chain", "codecs": [{"name": "topk", "fraction": 0.1},
    {"name": "quantize", "bits": 8}]}``. Errors are ``ValueError``s naming the key as
    ``federated.compression.<key>`` (``...codecs[i].<key>`` inside a chain) and the valid values.
    """
    if spec is None:
        return identity()
    if not isinstance(spec, Mapping):
        raise ValueError(f"{prefix}: must be a mapping with a 'name' key, got {spec!r}")
    name = spec.get("name", "none")
    if name not in _SPEC_KEYS:
        raise _spec_error("name", f"unknown codec {name!r}; valid: {', '.join(CODEC_NAMES)}", prefix)
    allowed = _SPEC_KEYS[name]
    for key in spec:
        if key != "name" and key not in allowed:
            valid = ", ".join(("name",) + allowed)
            raise _spec_error(key, f"unknown key for codec {name!r}; valid keys: {valid}", prefix)
    if name == "none":
        return identity()
    if name == "bf16":
        return bf16()
    if name == "ffa_lora":
        return ffa_lora()
    if name == "quantize":
        bits, block_size, rotation = spec.get("bits", 8), spec.get("block_size"), spec.get("rotation", "none")
        _check_bits(bits, prefix)
        _check_block_size(block_size, prefix)
        _check_choice("rotation", rotation, ("none", "hadamard"), prefix)
        return quantize(int(bits), None if block_size is None else int(block_size), rotation)
    if name == "topk":
        if "fraction" not in spec:
            raise _spec_error("fraction", "is required for codec 'topk' (a number in (0, 1])", prefix)
        _check_fraction(spec["fraction"], prefix)
        error_feedback = spec.get("error_feedback", True)
        if not isinstance(error_feedback, bool):
            raise _spec_error("error_feedback", f"must be true or false, got {error_feedback!r}", prefix)
        return topk(float(spec["fraction"]), error_feedback)
    parts = spec.get("codecs")
    if not isinstance(parts, (list, tuple)) or not parts:
        raise _spec_error("codecs", f"must be a non-empty list of codec specs, got {parts!r}", prefix)
    return chain(*(make_codec(part, f"{prefix}.codecs[{i}]") for i, part in enumerate(parts)))
