"""Federated core on a toy model: client update, aggregation, algorithm, backends, composition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from fedjax_fm import fl

D_IN, D_OUT = 6, 3


def toy_loss(trainable, frozen, batch, rng):
    """Weighted squared error of a linear model with a frozen bias and dropout on the inputs."""
    keep_prob = frozen["keep_prob"]  # 1.0: no dropout
    keep = jax.random.bernoulli(rng, keep_prob, batch["x"].shape)
    x = jnp.where(keep, batch["x"] / keep_prob, 0.0)
    pred = x @ trainable["w"] + trainable["b"] + frozen["c"]
    w = batch["example_weight"]
    per_example = jnp.sum((pred - batch["y"]) ** 2, axis=-1)
    return jnp.sum(w * per_example) / jnp.maximum(jnp.sum(w), 1.0), {}


# Shared client updates: jax caches compilations per function object, so reusing
# them across tests keeps this file fast.
SGD = fl.make_client_update(toy_loss, optax.sgd(0.1))
ADAMW = fl.make_client_update(toy_loss, optax.adamw(0.05))


def toy_params():
    rng = np.random.default_rng(1)
    trainable = {"w": jnp.asarray(rng.normal(size=(D_IN, D_OUT)), jnp.float32), "b": jnp.zeros((D_OUT,), jnp.float32)}
    return trainable, {"c": jnp.ones((D_OUT,), jnp.float32), "keep_prob": jnp.float32(1.0)}


def toy_batches(clients=5, steps=3, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(clients, steps, batch, D_IN)).astype(np.float32),
        "y": rng.normal(size=(clients, steps, batch, D_OUT)).astype(np.float32),
        "attention_mask": np.ones((clients, steps, batch, 5), np.int32),
        "example_weight": np.ones((clients, steps, batch), np.float32),
    }


def max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run_rounds(algorithm, frozen, batches, rounds=2, seed=0):
    trainable, _ = toy_params()
    state = algorithm.init(trainable, seed)
    ids = np.arange(batches["x"].shape[0]) + 10
    for _ in range(rounds):
        state, metrics = algorithm.round(state, frozen, batches, ids)
    return state, metrics


def test_fedavg_one_client_one_sgd_step_equals_centralised_sgd():
    trainable, frozen = toy_params()
    batches = toy_batches(clients=1, steps=1)
    algorithm = fl.FederatedAlgorithm(SGD, fl.fedavg())
    state, _ = run_rounds(algorithm, frozen, batches, rounds=1)
    batch = {k: v[0, 0] for k, v in batches.items()}
    grads = jax.grad(lambda p: toy_loss(p, frozen, batch, jax.random.PRNGKey(0))[0])(trainable)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, trainable, grads)
    assert max_diff(state.params, expected) <= 1e-6


def test_fedavg_over_identical_clients_equals_one_client():
    _, frozen = toy_params()
    one = toy_batches(clients=1, steps=3)
    many = {k: np.repeat(v, 4, axis=0) for k, v in one.items()}
    make = lambda: fl.FederatedAlgorithm(ADAMW, fl.fedavg())  # noqa: E731
    single, _ = run_rounds(make(), frozen, one, rounds=2)
    several, metrics = run_rounds(make(), frozen, many, rounds=2)
    assert max_diff(single.params, several.params) <= 1e-6
    np.testing.assert_allclose(np.asarray(metrics["client_loss"]), np.asarray(metrics["client_loss"])[0], rtol=1e-6)


def test_client_update_metrics_and_padding_steps():
    trainable, frozen = toy_params()
    batches = {k: v[0] for k, v in toy_batches(clients=1, steps=3).items()}
    update = jax.jit(ADAMW)
    rng = jax.random.PRNGKey(0)
    padded = dict(batches, example_weight=batches["example_weight"].copy())
    padded["example_weight"][2] = 0.0  # the third step is all padding: must be skipped
    short = {k: v[:2] for k, v in batches.items()}
    delta_padded, n_padded, m_padded = update(trainable, frozen, padded, rng)
    delta_short, n_short, m_short = update(trainable, frozen, short, rng)
    assert max_diff(delta_padded, delta_short) == 0.0
    assert float(n_padded) == float(n_short) == 8.0
    assert int(m_padded["steps"]) == 2
    assert float(m_padded["loss"]) == pytest.approx(float(m_short["loss"]), rel=1e-6)
    assert float(m_padded["tokens"]) == 2 * 4 * 5  # Σ attention_mask · weight


def test_client_update_rejects_badly_shaped_batches():
    trainable, frozen = toy_params()
    batches = {k: v[0, 0] for k, v in toy_batches(clients=1, steps=1).items()}  # no [steps] axis
    update = SGD
    with pytest.raises(AssertionError):
        update(trainable, frozen, batches, jax.random.PRNGKey(0))
    with pytest.raises(KeyError, match="example_weight"):
        update(trainable, frozen, {"x": batches["x"][None]}, jax.random.PRNGKey(0))


def test_aggregate_weighting_and_nonfinite_rejection():
    deltas = {"a": jnp.asarray([[1.0, 2.0], [3.0, 4.0], [jnp.nan, 0.0]])}
    n = jnp.asarray([1.0, 3.0, 5.0])
    res = fl.aggregate(deltas, n, weighting="examples")
    np.testing.assert_allclose(res.pseudo_gradient["a"], [(1 + 9) / 4, (2 + 12) / 4], rtol=1e-6)
    assert int(res.num_valid) == 2 and int(res.num_nonfinite) == 1 and bool(res.applied)
    res = fl.aggregate(deltas, n, weighting="uniform")
    np.testing.assert_allclose(res.pseudo_gradient["a"], [2.0, 3.0], rtol=1e-6)
    res = fl.aggregate(deltas, n, min_clients=3)
    assert not bool(res.applied)
    np.testing.assert_array_equal(res.pseudo_gradient["a"], [0.0, 0.0])


def test_nonfinite_client_is_excluded_from_the_round():
    _, frozen = toy_params()
    batches = toy_batches(clients=4)
    poisoned = dict(batches, x=batches["x"].copy())
    poisoned["x"][2, 1, 0, 0] = np.inf
    make = lambda: fl.FederatedAlgorithm(SGD, fl.fedavg())  # noqa: E731
    state, metrics = run_rounds(make(), frozen, poisoned, rounds=1)
    assert int(metrics["num_nonfinite_clients"]) == 1 and int(metrics["num_valid_clients"]) == 3
    assert list(np.asarray(metrics["client_valid"])) == [True, True, False, True]
    # Equal to a round over the three healthy clients only (same ids, hence same keys).
    healthy = {k: v[[0, 1, 3]] for k, v in batches.items()}
    algorithm = make()
    ref = algorithm.init(toy_params()[0], 0)
    ref, _ = algorithm.round(ref, frozen, healthy, np.asarray([10, 11, 13]))
    assert max_diff(state.params, ref.params) <= 1e-6
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))


def test_round_below_min_clients_is_reported_not_applied():
    trainable, frozen = toy_params()
    batches = toy_batches(clients=2)
    algorithm = fl.FederatedAlgorithm(
        SGD, fl.fedadam(), fl.make_aggregator(min_clients=3)
    )
    state0 = algorithm.init(trainable, 0)
    state1, metrics = algorithm.round(state0, frozen, batches, np.arange(2))
    assert not bool(metrics["applied"]) and int(state1.round) == 1
    assert max_diff(state1.params, state0.params) == 0.0
    assert max_diff(state1.opt_state, state0.opt_state) == 0.0


@pytest.mark.parametrize(
    "executor",
    [fl.Vmapped(), fl.Vmapped(group_size=2), fl.Sharded(), fl.Sharded(clients_per_device=1)],
    ids=["vmap", "vmap-groups", "sharded", "sharded-groups"],
)
def test_backends_equal_sequential(executor):
    _, frozen = toy_params()
    frozen = dict(frozen, keep_prob=jnp.float32(0.8))  # exercise the per-client dropout keys too
    batches = toy_batches(clients=5)
    update = ADAMW
    seq_state, seq_metrics = run_rounds(fl.FederatedAlgorithm(update, fl.fedyogi(), executor=fl.Sequential()), frozen, batches)
    state, metrics = run_rounds(fl.FederatedAlgorithm(update, fl.fedyogi(), executor=executor), frozen, batches)
    assert max_diff(state.params, seq_state.params) <= 1e-6
    assert max_diff(state.opt_state, seq_state.opt_state) <= 1e-6
    np.testing.assert_allclose(metrics["client_loss"], seq_metrics["client_loss"], atol=1e-6)
    assert metrics["client_loss"].shape == (5,)


def test_sharded_splits_clients_over_the_mesh():
    assert jax.device_count() == 4, "tests/conftest.py sets 4 virtual CPU devices"
    trainable, frozen = toy_params()
    algorithm = fl.FederatedAlgorithm(SGD, fl.fedavg(), executor=fl.Sharded())
    state = algorithm.init(trainable, 0)
    outputs = algorithm.run_clients(state, frozen, toy_batches(clients=8), np.arange(8))
    assert len(outputs.deltas["w"].sharding.device_set) == 4


def test_same_seed_bit_identical_and_other_seed_differs():
    _, frozen = toy_params()
    frozen = dict(frozen, keep_prob=jnp.float32(0.8))
    batches = toy_batches(clients=3)
    make = lambda: fl.FederatedAlgorithm(ADAMW, fl.fedadam())  # noqa: E731
    a, _ = run_rounds(make(), frozen, batches, rounds=3, seed=7)
    b, _ = run_rounds(make(), frozen, batches, rounds=3, seed=7)
    c, _ = run_rounds(make(), frozen, batches, rounds=3, seed=8)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert max_diff(a.params, c.params) > 0


def test_sample_clients_is_a_pure_function_of_seed_and_round():
    ids = fl.sample_clients(3, 5, 100, 10)
    np.testing.assert_array_equal(ids, fl.sample_clients(3, 5, 100, 10))
    assert len(set(ids.tolist())) == 10 and ids.min() >= 0 and ids.max() < 100
    assert not np.array_equal(ids, fl.sample_clients(3, 6, 100, 10))
    np.testing.assert_array_equal(fl.sample_clients(3, 5, 4, 4), np.arange(4))
    with pytest.raises(ValueError, match="clients_per_round"):
        fl.sample_clients(0, 0, 4, 5)


def test_server_state_checkpoints_with_orbax(tmp_path):
    trainable, frozen = toy_params()
    algorithm = fl.FederatedAlgorithm(SGD, fl.fedadamw())
    state, _ = algorithm.round(algorithm.init(trainable, 0), frozen, toy_batches(clients=2), np.arange(2))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "state", state)
        ckptr.wait_until_finished()
        restored = ckptr.restore(tmp_path / "state", algorithm.init(trainable, 0))
    assert isinstance(restored, fl.ServerState)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- Composition: wrapping pieces in plain Python, the way docs/federated.md shows. ---


def fedprox(loss_fn, mu):
    """FedProx: the local loss gains (μ/2)‖x − x_t‖², with x_t passed through `frozen`."""

    def prox_loss(trainable, frozen_and_anchor, batch, rng):
        frozen, anchor = frozen_and_anchor
        loss, aux = loss_fn(trainable, frozen, batch, rng)
        sq = sum(jnp.sum((p - a) ** 2) for p, a in zip(jax.tree.leaves(trainable), jax.tree.leaves(anchor)))
        return loss + 0.5 * mu * sq, aux

    def client_update_for(optimizer):
        inner = fl.make_client_update(prox_loss, optimizer)
        return lambda trainable, frozen, batches, rng: inner(trainable, (frozen, trainable), batches, rng)

    return client_update_for


def clipped(client_update, max_norm):
    """Clips each client's delta to global norm ≤ max_norm."""

    def update(trainable, frozen, batches, rng):
        delta, n, metrics = client_update(trainable, frozen, batches, rng)
        norm = optax.tree.norm(delta)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
        return jax.tree.map(lambda d: d * scale, delta), n, dict(metrics, delta_norm=norm)

    return update


def gaussian_noise(aggregator, stddev):
    """DP-FedAvg's server noise: N(0, stddev²) added to the aggregated pseudo-gradient."""

    def noisy(deltas, num_examples, rng):
        result = aggregator(deltas, num_examples, rng)
        leaves, treedef = jax.tree.flatten(result.pseudo_gradient)
        keys = jax.random.split(rng, len(leaves))
        noised = [x + stddev * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
        return result._replace(pseudo_gradient=jax.tree.unflatten(treedef, noised))

    return noisy


def test_fedprox_wrapper():
    _, frozen = toy_params()
    batches = toy_batches(clients=3, steps=4)
    plain, _ = run_rounds(fl.FederatedAlgorithm(fl.make_client_update(toy_loss, optax.sgd(0.05)), fl.fedavg()), frozen, batches, 1)
    prox0, _ = run_rounds(fl.FederatedAlgorithm(fedprox(toy_loss, 0.0)(optax.sgd(0.05)), fl.fedavg()), frozen, batches, 1)
    prox, _ = run_rounds(fl.FederatedAlgorithm(fedprox(toy_loss, 5.0)(optax.sgd(0.05)), fl.fedavg()), frozen, batches, 1)
    assert max_diff(prox0.params, plain.params) <= 1e-6  # μ = 0 is FedAvg
    start = toy_params()[0]
    moved = lambda s: float(optax.tree.norm(jax.tree.map(jnp.subtract, s.params, start)))  # noqa: E731
    assert moved(prox) < moved(plain)  # the proximal term keeps clients near x_t
    # It works under vmap too: the anchor (x_t) is shared, like the frozen base.
    vm, _ = run_rounds(fl.FederatedAlgorithm(fedprox(toy_loss, 5.0)(optax.sgd(0.05)), fl.fedavg(), executor=fl.Vmapped()), frozen, batches, 1)
    assert max_diff(vm.params, prox.params) <= 1e-6


def test_clipping_and_dp_noise_wrappers():
    trainable, frozen = toy_params()
    batches = toy_batches(clients=4, steps=4)
    update = clipped(fl.make_client_update(toy_loss, optax.sgd(0.2)), max_norm=0.01)
    algorithm = fl.FederatedAlgorithm(update, fl.fedavg(), executor=fl.Vmapped())
    state, metrics = algorithm.round(algorithm.init(trainable, 0), frozen, batches, np.arange(4))
    assert np.all(np.asarray(metrics["client_delta_norm"]) > 0.01)  # clipping was active
    assert float(optax.tree.norm(jax.tree.map(jnp.subtract, state.params, trainable))) <= 0.01 + 1e-6

    noisy = fl.FederatedAlgorithm(update, fl.fedavg(), gaussian_noise(fl.make_aggregator(), stddev=1.0))
    s1, _ = noisy.round(noisy.init(trainable, 0), frozen, batches, np.arange(4))
    s2, _ = noisy.round(noisy.init(trainable, 0), frozen, batches, np.arange(4))
    noise = jax.tree.map(jnp.subtract, s1.params, state.params)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(noise)])
    assert 0.5 < flat.std() < 1.5  # about N(0, 1) per coordinate
    assert max_diff(s1.params, s2.params) == 0.0  # the noise key is derived from (seed, round)
