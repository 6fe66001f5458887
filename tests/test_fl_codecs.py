"""Update codecs (fedjax_fm.fl.codecs): unbiasedness, exact bytes, error bounds, error feedback, FFA-LoRA, jit/vmap."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import fl
from fedjax_fm.fl import codecs

KEY = jax.random.PRNGKey(0)


def _delta(shape=(6, 8), seed=1):
    # Heavy-ish tails so blocks have different ranges and rotation matters.
    return jax.random.t(jax.random.PRNGKey(seed), 3.0, shape, jnp.float32)


def _roundtrip(codec, x, key=KEY):
    # Jitted: one compile is cheaper on a CPU than dispatching every small op eagerly.
    decoded, _, payload = jax.jit(lambda d, s, k: codecs.roundtrip(codec, d, s, k))(x, codec.init(x), key)
    return decoded, payload


def _quantized_nodes(payload):
    is_node = lambda n: isinstance(n, codecs.Quantized)  # noqa: E731
    return [n for n in jax.tree.leaves(payload, is_leaf=is_node) if is_node(n)]


# ------------------------------------------------------------------ quantiser


@pytest.mark.parametrize(
    "bits,block_size,rotation",
    [(8, None, "none"), (4, 16, "none"), (2, 16, "none"), (3, None, "none"),
     (2, 16, "hadamard"), (4, None, "hadamard")],
)
def test_quantizer_is_unbiased(bits, block_size, rotation):
    x = _delta()
    codec = fl.quantize(bits, block_size, rotation)
    n = 2000
    keys = jax.random.split(jax.random.PRNGKey(7), n)
    decoded, _, payload = jax.jit(jax.vmap(lambda k: codecs.roundtrip(codec, x, (), k)))(keys)
    # Per coordinate Var ≤ step²/4 (rotated: the rotated block's step), so σ ≤ max step / 2.
    sigma = float(jnp.max(_quantized_nodes(payload)[0].step)) / 2
    assert sigma > 0
    tolerance = 5 * sigma / math.sqrt(n)
    error_of_mean = np.abs(np.asarray(jnp.mean(decoded, axis=0) - x))
    assert error_of_mean.max() <= tolerance + 1e-6
    # ... while single draws are far off (the test is not vacuous).
    assert float(jnp.max(jnp.abs(decoded[0] - x))) > 2 * tolerance


def test_32_bits_is_the_identity():
    x = _delta()
    decoded, payload = _roundtrip(fl.make_codec({"name": "quantize", "bits": 32}), x)
    np.testing.assert_array_equal(decoded, x)
    assert fl.tree_nbytes(payload) == x.size * 4


def test_bf16_roundtrip_within_bf16_precision():
    x = {"w": _delta(), "n": jnp.arange(3, dtype=jnp.int32)}
    decoded, payload = _roundtrip(fl.bf16(), x)
    assert decoded["w"].dtype == jnp.float32
    assert np.all(np.abs(decoded["w"] - x["w"]) <= 2.0**-8 * np.abs(x["w"]))
    np.testing.assert_array_equal(decoded["n"], x["n"])  # non-float leaves pass through
    assert fl.tree_nbytes(payload) == x["w"].size * 2 + 3 * 4


@pytest.mark.parametrize(
    "spec,expected",
    [
        ({"name": "quantize", "bits": 4}, 500 + 8),  # 2 codes per byte + float32 low and step
        ({"name": "quantize", "bits": 4, "block_size": 256}, 500 + 4 * 8),  # last block's padding not sent
        ({"name": "quantize", "bits": 2}, 250 + 8),
        ({"name": "quantize", "bits": 3}, 375 + 8),  # 3-bit codes as a bit stream
        ({"name": "quantize", "bits": 8, "block_size": 100}, 1000 + 10 * 8),
        ({"name": "quantize", "bits": 4, "block_size": 256, "rotation": "hadamard"}, 1024 // 2 + 4 * 8 + 4),
        ({"name": "quantize", "bits": 4, "block_size": 200, "rotation": "hadamard"}, 5 * 256 // 2 + 5 * 8 + 4),
        ({"name": "bf16"}, 2000),
        ({"name": "none"}, 4000),
        ({"name": "topk", "fraction": 0.01}, 10 * (4 + 4)),
        ({"name": "chain", "codecs": [{"name": "topk", "fraction": 0.1}, {"name": "quantize", "bits": 8}]},
         100 + 8 + 100 * 4),
    ],
)
def test_payload_bytes_are_the_real_bytes(spec, expected):
    x = jax.random.normal(KEY, (1000,))
    codec = fl.make_codec(spec)
    _, payload = _roundtrip(codec, x)
    assert fl.tree_nbytes(payload) == expected
    assert sum(leaf.nbytes for leaf in jax.tree.leaves(payload)) == expected
    assert fl.encoded_bytes(codec, x) == expected  # from shapes alone, without encoding


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_bits_is_a_little_endian_bit_stream(bits):
    n = 37
    codes = jax.random.randint(KEY, (n,), 0, 1 << bits).astype(jnp.uint32)
    packed = codecs.pack_bits(codes, bits)
    stream = (np.asarray(codes)[:, None] >> np.arange(bits)) & 1
    np.testing.assert_array_equal(packed, np.packbits(stream.reshape(-1).astype(np.uint8), bitorder="little"))
    np.testing.assert_array_equal(codecs.unpack_bits(packed, bits, n), codes)


def test_hadamard_transform_is_orthonormal_sylvester():
    x = jax.random.normal(KEY, (3, 16))
    sylvester = np.array([[1.0]])
    while sylvester.shape[0] < 16:
        sylvester = np.block([[sylvester, sylvester], [sylvester, -sylvester]])
    y = codecs.hadamard_transform(x)
    np.testing.assert_allclose(y, np.asarray(x) @ sylvester / 4.0, atol=1e-5)
    np.testing.assert_allclose(codecs.hadamard_transform(y), x, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_decode_encode_error_within_one_step_per_element(bits):
    x = _delta((10, 10))
    decoded, payload = _roundtrip(fl.quantize(bits, block_size=16), x)
    (node,) = _quantized_nodes(payload)
    blocks = jnp.pad((decoded - x).reshape(-1), (0, 12)).reshape(7, 16)
    # |x̂ − x| ≤ step = (max − min)/(2^bits − 1) of the element's block (float slack).
    assert np.all(np.abs(blocks) <= node.step[:, None] * (1 + 1e-5) + 1e-6)
    ranges = jnp.stack([jnp.ptp(b) for b in jnp.pad(x.reshape(-1), (0, 12), mode="edge").reshape(7, 16)])
    np.testing.assert_allclose(node.step, ranges / (2**bits - 1), rtol=1e-6)


def test_rotated_error_within_sqrt_p_steps_per_block():
    x = _delta((100,))
    decoded, payload = _roundtrip(fl.quantize(2, block_size=20, rotation="hadamard"), x)
    (node,) = _quantized_nodes(payload)
    errors = jnp.linalg.norm((decoded - x).reshape(5, 20), axis=1)
    assert np.all(errors <= math.sqrt(32) * node.step * (1 + 1e-5))


# -------------------------------------------------------------------- top-k


def test_topk_keeps_exactly_k_largest_entries():
    x = {"w": jax.random.normal(KEY, (20, 50)), "b": jax.random.normal(jax.random.PRNGKey(3), (30,))}
    codec = fl.topk(0.01, error_feedback=False)
    assert codec.init(x) == ()
    decoded, payload = _roundtrip(codec, x)
    assert int(jnp.sum(decoded["w"] != 0)) == 10
    assert int(jnp.sum(decoded["b"] != 0)) == 1  # ⌈0.3⌉, at least one
    kept = np.sort(np.abs(np.asarray(decoded["w"][decoded["w"] != 0])))
    np.testing.assert_array_equal(kept, np.sort(np.abs(np.asarray(x["w"]).reshape(-1)))[-10:])
    assert payload["w"].indices.dtype == jnp.int32
    full, _ = _roundtrip(fl.topk(1.0), x)
    np.testing.assert_array_equal(full["w"], x["w"])


def test_error_feedback_loses_nothing_over_rounds():
    codec = fl.topk(0.05, error_feedback=True)
    template = {"w": jnp.zeros((8, 16)), "b": jnp.zeros((5,))}
    state = codec.init(template)
    encode = jax.jit(codec.encode)
    sum_sent = jax.tree.map(jnp.zeros_like, template)
    sum_delta = jax.tree.map(jnp.zeros_like, template)
    for t in range(6):
        delta = jax.tree.map(lambda z, i: jax.random.normal(jax.random.PRNGKey(10 * t + i), z.shape),
                             template, {"w": 0, "b": 1})
        payload, state = encode(delta, state, KEY)
        sum_sent = jax.tree.map(jnp.add, sum_sent, codec.decode(payload))
        sum_delta = jax.tree.map(jnp.add, sum_delta, delta)
    # Σ sent + r_T == Σ δ (telescoping s_t + r_t = δ_t + r_{t−1}).
    for name in template:
        np.testing.assert_allclose(sum_sent[name] + state[name], sum_delta[name], atol=1e-5)
        assert float(jnp.max(jnp.abs(state[name]))) > 0  # something was held back


def test_client_codec_states_are_kept_per_client():
    codec = fl.topk(0.1)
    template = {"w": jnp.zeros((4, 5))}
    states = fl.init_client_states(codec, template, num_clients=5)
    assert states["w"].shape == (5, 4, 5)
    ids = jnp.array([3, 1])
    deltas = {"w": jax.random.normal(KEY, (2, 4, 5))}
    _, new = jax.vmap(codec.encode)(deltas, fl.take_client_states(states, ids), jax.random.split(KEY, 2))
    states = fl.put_client_states(states, ids, new)
    np.testing.assert_array_equal(states["w"][ids], new["w"])
    assert float(jnp.max(jnp.abs(states["w"][jnp.array([0, 2, 4])]))) == 0.0


# ------------------------------------------------------------------- FFA-LoRA


def _lora_tree():
    a = jax.random.normal(KEY, (4, 2))
    b = jax.random.normal(jax.random.PRNGKey(2), (2, 3))  # B ≠ 0, so A has a real gradient
    return {"lora": {"q": {"lora_A": a, "lora_B": b}}}


def _lora_loss(trainable, frozen, batch, rng):
    del frozen, rng
    adapter = trainable["lora"]["q"]
    pred = batch["x"] @ adapter["lora_A"] @ adapter["lora_B"]
    return jnp.mean((pred - batch["y"]) ** 2), None


def _lora_batches(steps=3, rows=5, seed=4):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {"x": jax.random.normal(k1, (steps, rows, 4)), "y": jax.random.normal(k2, (steps, rows, 3)),
            "example_weight": jnp.ones((steps, rows))}


def test_ffa_lora_client_update_never_changes_a():
    trainable = _lora_tree()
    adamw = optax.adamw(0.1, weight_decay=0.5)
    delta, _, _ = jax.jit(fl.make_client_update(_lora_loss, fl.freeze_lora_a(adamw)))(
        trainable, {}, _lora_batches(), KEY)
    assert np.all(np.asarray(delta["lora"]["q"]["lora_A"]) == 0.0)
    assert float(jnp.max(jnp.abs(delta["lora"]["q"]["lora_B"]))) > 0
    # Without freezing, the same update does move A (the check above is not vacuous).
    plain, _, _ = fl.make_client_update(_lora_loss, adamw)(trainable, {}, _lora_batches(), KEY)
    assert float(jnp.max(jnp.abs(plain["lora"]["q"]["lora_A"]))) > 0

    # Through the whole round: server A is bit-identical after FedAvg rounds.
    algorithm = fl.FederatedAlgorithm(fl.make_client_update(_lora_loss, fl.freeze_lora_a(adamw)), fl.fedavg())
    state = algorithm.init(trainable, seed=0)
    batches = jax.tree.map(lambda *xs: jnp.stack(xs), _lora_batches(seed=4), _lora_batches(seed=5))
    for _ in range(2):
        state, _ = algorithm.round(state, {}, batches, jnp.array([0, 1]))
    np.testing.assert_array_equal(state.params["lora"]["q"]["lora_A"], trainable["lora"]["q"]["lora_A"])


def test_ffa_lora_codec_sends_only_b():
    trainable = _lora_tree()
    delta = jax.tree.map(lambda x: x * 0.1, trainable)
    delta["lora"]["q"]["lora_A"] = jnp.zeros_like(delta["lora"]["q"]["lora_A"])
    decoded, payload = _roundtrip(fl.ffa_lora(), delta)
    assert fl.tree_nbytes(payload) == 2 * 3 * 4  # B only
    np.testing.assert_array_equal(decoded["lora"]["q"]["lora_B"], delta["lora"]["q"]["lora_B"])
    np.testing.assert_array_equal(decoded["lora"]["q"]["lora_A"], jnp.zeros((4, 2)))
    _, payload8 = _roundtrip(fl.make_codec({"name": "chain", "codecs": [{"name": "ffa_lora"},
                                                                        {"name": "quantize", "bits": 8}]}), delta)
    assert fl.tree_nbytes(payload8) == 6 + 8
    with pytest.raises(ValueError, match="no LoRA A leaf"):
        fl.ffa_lora().encode({"params": {"kernel": jnp.ones(3)}}, (), KEY)
    with pytest.raises(ValueError, match="no LoRA A leaf"):
        fl.freeze_lora_a(optax.sgd(0.1)).init({"params": {"kernel": jnp.ones(3)}})


# ----------------------------------------------------------------- jit / vmap


CODECS = {
    "bf16": fl.bf16(),
    "quantize4_hadamard": fl.quantize(4, block_size=8, rotation="hadamard"),
    "quantize3": fl.quantize(3, block_size=5),
    "topk_ef": fl.topk(0.2),
    "topk_then_q8": fl.chain(fl.topk(0.25), fl.quantize(8)),
    "ffa_then_q4": fl.chain(fl.ffa_lora(), fl.quantize(4)),
}


@pytest.mark.parametrize("name", sorted(CODECS))
def test_codecs_jit_and_vmap_equal_unjitted(name):
    codec = CODECS[name]
    template = _lora_tree()
    clients = 3
    deltas = jax.tree.map(lambda x: jax.random.normal(KEY, (clients,) + x.shape), template)
    rngs = jax.random.split(jax.random.PRNGKey(9), clients)
    states = fl.init_client_states(codec, template, clients)
    states = jax.tree.map(lambda s: s + 0.01, states)  # a non-trivial residual for error feedback

    step = lambda d, s, k: codecs.roundtrip(codec, d, s, k)  # noqa: E731
    batched = jax.jit(jax.vmap(step))(deltas, states, rngs)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # noqa: E731
    for c in (0, clients - 1):
        one = jax.tree.map(lambda x: x[c], (deltas, states, rngs))
        eager = step(*one)
        jax.tree.map(close, eager, jax.tree.map(lambda x: x[c], batched))
        if c == 0:
            jax.tree.map(close, eager, jax.jit(step)(*one))
    assert fl.tree_nbytes(batched[2]) == clients * fl.encoded_bytes(codec, template)


# ---------------------------------------------------------------- downlink


def test_downlink_bytes():
    params = {"w": jnp.zeros((10, 10)), "b": jnp.zeros((10,))}
    assert fl.downlink_bytes(params) == 110 * 4
    assert fl.downlink_bytes(params, fl.bf16()) == 110 * 2
    assert fl.downlink_bytes(params, fl.quantize(8)) == 110 + 2 * 8


# -------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "spec,key,valid",
    [
        ({"name": "zip"}, "federated.compression.name", "quantize"),
        ({"name": "quantize", "bits": 0}, "federated.compression.bits", "1..16"),
        ({"name": "quantize", "bits": 33}, "federated.compression.bits", "32"),
        ({"name": "quantize", "bits": True}, "federated.compression.bits", "1..16"),
        ({"name": "quantize", "block_size": 0}, "federated.compression.block_size", "positive"),
        ({"name": "quantize", "rotation": "dct"}, "federated.compression.rotation", "hadamard"),
        ({"name": "quantize", "bitz": 4}, "federated.compression.bitz", "bits, block_size, rotation"),
        ({"name": "topk", "fraction": 0.0}, "federated.compression.fraction", "(0, 1]"),
        ({"name": "topk", "fraction": 1.5}, "federated.compression.fraction", "(0, 1]"),
        ({"name": "topk"}, "federated.compression.fraction", "(0, 1]"),
        ({"name": "topk", "fraction": 0.1, "error_feedback": "yes"}, "federated.compression.error_feedback", "true"),
        ({"name": "chain", "codecs": []}, "federated.compression.codecs", "non-empty"),
        ({"name": "chain", "codecs": [{"name": "ffa_lora"}, {"name": "quantize", "bits": 0}]},
         "federated.compression.codecs[1].bits", "1..16"),
    ],
)
def test_bad_specs_name_the_key_and_the_valid_values(spec, key, valid):
    with pytest.raises(ValueError) as info:
        fl.make_codec(spec)
    message = str(info.value)
    assert message.startswith(key + ":")
    assert valid in message


def test_topk_count_is_exact_for_decimal_fractions():
    assert codecs.topk_count(0.07, 100) == 7  # not 8 from ⌈0.07 * 100⌉ = ⌈7.000000000000001⌉
    assert codecs.topk_count(0.3, 10) == 3
    assert codecs.topk_count(1e-9, 10) == 1
    assert codecs.topk_count(1, 7) == 7
