"""DP-FedAvg: clipping, noise scale, adaptive clipping, Poisson sampling, the accountant, config checks."""

from __future__ import annotations

import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting import NeighboringRelation

from fedjax_fm import fl

# ---------------------------------------------------------------- the accountant


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_poisson_epsilon_equals_dp_accounting_directly(accountant):
    q, z, rounds, delta = 0.01, 1.0, 500, 1e-6
    ours = fl.epsilon(z, "poisson", q=q, rounds=rounds, delta=delta, accountant=accountant)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    if accountant == "rdp":
        direct = dp_accounting.rdp.RdpAccountant()
    else:
        direct = dp_accounting.pld.PLDAccountant(value_discretization_interval=fl.accountant.PLD_DISCRETIZATION)
    direct.compose(event)
    assert ours == pytest.approx(direct.get_epsilon(delta), rel=1e-9)


def test_fixed_size_epsilon_is_replace_one_with_half_the_multiplier():
    # Fixed-size sampling: replace-one neighbours, sum sensitivity 2C, so the
    # Gaussian event's multiplier is z/2 (see fl/accountant.py).
    z, k, n, rounds, delta = 1.2, 10, 1000, 300, 1e-5
    ours = fl.epsilon(z, "fixed", clients_per_round=k, population=n, rounds=rounds, delta=delta)
    direct = dp_accounting.rdp.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    direct.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(n, k, dp_accounting.GaussianDpEvent(z / 2)), rounds
    )
    assert ours == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
    # Honest, hence no better than Poisson at the same rate.
    assert ours > fl.epsilon(z, "poisson", q=k / n, rounds=rounds, delta=delta)


# TensorFlow Privacy, tutorials/README.md ("Select Parameters" table of the DP-SGD MNIST
# tutorial, mnist_dpsgd_tutorial.py; Abadi et al. 2016's setting): N = 60000, batch 256
# (Poisson rate q = 256/60000), δ = 1e-5, steps = ceil(epochs · N / batch) as in
# compute_dp_sgd_privacy.py. Published ε (moments accountant / RDP with the classic
# conversion ε = min_α RDP(α) + log(1/δ)/(α−1)), rounded to 2 decimals:
#   z = 1.1, 60 epochs -> 3.01;  z = 1.3, 15 epochs -> 1.19;  z = 0.7, 45 epochs -> 7.10.
@pytest.mark.parametrize("z, epochs, published", [(1.1, 60, 3.01), (1.3, 15, 1.19), (0.7, 45, 7.10)])
def test_rdp_matches_published_tf_privacy_mnist(z, epochs, published):
    n, batch, delta = 60000, 256, 1e-5
    steps = math.ceil(epochs * n / batch)
    ledger = fl.PrivacyLedger(z, "poisson", q=batch / n, delta=delta, accountant="rdp")
    ledger.record_rounds(steps)
    rdp, orders = ledger.accountant.rdp, ledger.accountant.orders  # the RDP curve we composed
    classic = float(np.min(rdp + math.log(1 / delta) / (orders - 1)))
    # Tolerance: the published figure is rounded to 0.01, and dp_accounting's order grid
    # differs slightly from TF Privacy's of 2019; 0.02 covers both.
    assert classic == pytest.approx(published, abs=0.02)
    # What we report uses dp_accounting's tighter conversion: never above the classic one.
    assert ledger.epsilon() <= classic + 1e-9


def test_ledger_incremental_equals_one_shot_and_budget_helper():
    kwargs = dict(q=0.05, delta=1e-5)
    ledger = fl.PrivacyLedger(1.0, "poisson", **kwargs)
    assert ledger.epsilon() == 0.0
    history = []
    for _ in range(20):
        ledger.record_rounds()
        history.append(ledger.epsilon())
    assert history == sorted(history)
    assert history[-1] == pytest.approx(fl.epsilon(1.0, "poisson", rounds=20, **kwargs), rel=1e-9)
    rounds = fl.max_rounds_within(history[9] + 1e-9, 1.0, "poisson", max_rounds=1000, **kwargs)
    assert rounds == 10
    assert fl.max_rounds_within(1e-6, 1.0, "poisson", max_rounds=1000, **kwargs) == 0


def test_pld_with_fixed_size_sampling_is_refused():
    with pytest.raises(fl.DPConfigError, match=r"federated\.dp\.accountant 'pld'.*'fixed'"):
        fl.epsilon(1.0, "fixed", clients_per_round=5, population=100, rounds=3, delta=1e-5, accountant="pld")


def test_noise_split_of_adaptive_clipping():
    z, sigma_b = 1.0, 5.0  # (Andrew et al. 2021 suggest σ_b = K/20)
    z_update = fl.update_noise_multiplier(z, sigma_b)
    assert z_update == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    assert z_update > z
    assert fl.effective_noise_multiplier(z_update, sigma_b) == pytest.approx(z)
    with pytest.raises(ValueError, match="count_stddev"):
        fl.update_noise_multiplier(1.0, 0.5)


# ---------------------------------------------------------------- config checks

GOOD = dict(noise_multiplier=1.0, clip_norm=0.1, delta=1e-4, population=1000, sampling="poisson", q=0.01)


def test_valid_configs_pass():
    fl.validate_dp_config(**GOOD)
    fl.validate_dp_config(**dict(GOOD, sampling="fixed", q=None, clients_per_round=10))
    fl.validate_dp_config(
        **GOOD, adaptive_target_quantile=0.5, adaptive_learning_rate=0.2, adaptive_count_stddev=2.0
    )


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(weighting="examples"), "federated.weighting"),
        (dict(sampling="shuffle"), "federated.dp.sampling"),
        (dict(delta=1e-3), "federated.dp.delta"),  # = 1/population
        (dict(delta=0.5), "federated.dp.delta"),
        (dict(noise_multiplier=0.0), "federated.dp.noise_multiplier"),
        (dict(noise_multiplier=-1.0), "federated.dp.noise_multiplier"),
        (dict(clip_norm=0.0), "federated.dp.clip_norm"),
        (dict(clip_norm=float("inf")), "federated.dp.clip_norm"),
        (dict(q=0.0), "federated.dp.sampling_rate"),
        (dict(q=None, sampling="fixed", clients_per_round=2000), "federated.clients_per_round"),
        (dict(q=None, sampling="fixed", clients_per_round=10, accountant="pld"), "federated.dp.accountant"),
        (dict(accountant="moments"), "federated.dp.accountant"),
        (dict(min_clients=3), "federated.min_clients"),
        (dict(population=0), "federated.num_clients"),
        (dict(target_epsilon=0.0), "federated.dp.target_epsilon"),
        (
            dict(adaptive_target_quantile=0.5, adaptive_learning_rate=0.2, adaptive_count_stddev=0.4),
            "federated.dp.adaptive_clipping.count_stddev",
        ),
        (
            dict(adaptive_target_quantile=1.5, adaptive_learning_rate=0.2, adaptive_count_stddev=2.0),
            "federated.dp.adaptive_clipping.target_quantile",
        ),
    ],
)
def test_refused_configs_name_the_key(change, key):
    with pytest.raises(fl.DPConfigError) as info:
        fl.validate_dp_config(**dict(GOOD, **change))
    assert str(info.value).startswith(key), str(info.value)


# ---------------------------------------------------------------- aggregation


def random_deltas(clients, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        "a": jnp.asarray(scale * rng.normal(size=(clients, 4, 3)), jnp.float32),
        "b": {"c": jnp.asarray(scale * rng.normal(size=(clients, 5)), jnp.float32)},
    }


def test_clipping_bounds_every_client():
    deltas = random_deltas(6, scale=3.0)
    clipped, norms = fl.clip_deltas(deltas, 0.5)
    after = fl.client_norms(clipped)
    assert np.all(np.asarray(after) <= 0.5 * (1 + 1e-6))
    small = np.asarray(norms) <= 0.5  # those already inside the ball are untouched
    assert np.allclose(np.asarray(after)[small], np.asarray(norms)[small])


def test_outlier_influence_is_at_most_c_over_k():
    c, k = 0.3, 5
    aggregate = jax.jit(fl.make_dp_aggregator(c, noise_multiplier=1.0, expected_clients=k))
    deltas = random_deltas(k, scale=0.01)
    n = jnp.ones([k])
    rng = jax.random.PRNGKey(3)
    base = aggregate(deltas, n, rng).pseudo_gradient
    outlier = jax.tree.map(lambda x: x.at[2].set(1e6), deltas)
    moved = aggregate(outlier, n, rng).pseudo_gradient  # same key: same noise
    diff = optax.tree.norm(jax.tree.map(jnp.subtract, moved, base))
    assert float(diff) <= c / k * (1 + 1e-5) + 1e-7


def test_rejected_and_padded_clients_contribute_nothing():
    k = 4
    deltas = random_deltas(k + 2, scale=0.1)
    deltas = jax.tree.map(lambda x: x.at[k].set(jnp.nan), deltas)  # non-finite client
    n = jnp.asarray([3.0, 1.0, 7.0, 2.0, 5.0, 0.0])  # last slot: padding (weight 0) with garbage
    rng = jax.random.PRNGKey(0)
    result = fl.dp_aggregate(deltas, n, rng, clip_norm=1.0, noise_multiplier=0.5, expected_clients=k)
    only_real = fl.dp_aggregate(
        jax.tree.map(lambda x: x[:k], deltas), n[:k], rng, clip_norm=1.0, noise_multiplier=0.5, expected_clients=k
    )
    for x, y in zip(jax.tree.leaves(result.pseudo_gradient), jax.tree.leaves(only_real.pseudo_gradient)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert int(result.num_nonfinite) == 1 and int(result.num_valid) == k
    assert bool(result.applied)
    # Uniform weights: the example counts of valid clients do not matter.
    reweighted = fl.dp_aggregate(
        jax.tree.map(lambda x: x[:k], deltas), n[:k] * 10, rng, clip_norm=1.0, noise_multiplier=0.5, expected_clients=k
    )
    assert jax.tree.all(jax.tree.map(jnp.array_equal, reweighted.pseudo_gradient, only_real.pseudo_gradient))


def test_noise_stddev_is_z_c_over_k():
    z, c, k = 1.3, 0.2, 8
    deltas = {"w": jnp.zeros([k, 500]), "v": jnp.zeros([k, 3, 7])}
    aggregate = fl.make_dp_aggregator(c, z, k)
    rngs = jax.random.split(jax.random.PRNGKey(7), 400)
    out = jax.jit(jax.vmap(lambda r: aggregate(deltas, jnp.ones([k]), r).pseudo_gradient))(rngs)
    samples = np.concatenate([np.asarray(x).reshape(-1) for x in jax.tree.leaves(out)])
    expected = z * c / k
    assert abs(samples.mean()) < 0.01 * expected
    assert samples.std() == pytest.approx(expected, rel=0.01)  # ~208k draws: std's s.e. ≈ 0.16%
    # Different rounds' keys give independent noise: leaf "v" is not the same as "w"'s head.
    assert not np.allclose(np.asarray(out["w"][0, :21]), np.asarray(out["v"][0]).reshape(-1))


def test_adaptive_clipping_moves_c_to_the_target_quantile():
    k, d = 200, 16
    rng = np.random.default_rng(0)
    # Synthetic client updates with log-normal norms; their median is exp(0) = 1.
    directions = rng.normal(size=(k, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    norms = np.exp(rng.normal(0.0, 0.5, size=k))
    deltas = {"w": jnp.asarray(directions * norms[:, None], jnp.float32)}
    true_quantile = {0.5: np.quantile(norms, 0.5), 0.8: np.quantile(norms, 0.8)}
    for gamma, start in [(0.5, 0.01), (0.5, 50.0), (0.8, 0.05)]:
        adaptive = fl.AdaptiveClipping(target_quantile=gamma, learning_rate=0.2, count_stddev=k / 20)
        agg = fl.dp_fedavg_aggregator(start, noise_multiplier=1.0, expected_clients=k, adaptive=adaptive)
        update = jax.jit(agg.update)
        state = agg.init()
        for t in range(150):
            result, state = update(deltas, jnp.ones([k]), jax.random.PRNGKey(t), state)
        assert float(result.clip_norm) == pytest.approx(true_quantile[gamma], rel=0.15), (gamma, start)
        assert float(result.noise_stddev) == pytest.approx(
            fl.update_noise_multiplier(1.0, k / 20) * float(result.clip_norm) / k, rel=1e-5
        )


def test_dp_aggregator_in_a_federated_algorithm():
    # The fixed-clip aggregator plugs into FederatedAlgorithm as is; its extra fields ride along.
    def client_update(trainable, frozen, batches, rng):
        del frozen, rng
        return jax.tree.map(lambda p: p + batches["x"][0, 0], trainable), jnp.float32(1.0), {"loss": jnp.float32(0)}

    algorithm = fl.FederatedAlgorithm(client_update, fl.fedavg(), fl.make_dp_aggregator(0.5, 1.0, 3), fl.Vmapped())
    state = algorithm.init({"w": jnp.zeros([4])}, 0)
    batches = {"x": np.full((3, 1, 1), 10.0, np.float32), "example_weight": np.ones((3, 1, 1), np.float32)}
    state, metrics = algorithm.round(state, {}, batches, np.arange(3))
    assert bool(metrics["applied"]) and int(state.round) == 1
    assert np.all(np.isfinite(np.asarray(state.params["w"])))


# ---------------------------------------------------------------- Poisson sampling


def test_poisson_sampling_is_pure_and_has_rate_q():
    n, q = 1000, 0.05
    first = fl.poisson_sample_clients(5, 3, n, q)
    again = fl.poisson_sample_clients(5, 3, n, q)
    np.testing.assert_array_equal(first.ids, again.ids)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert first.ids.shape == first.mask.shape == (fl.poisson_max_clients(n, q),)
    assert not np.array_equal(first.ids, fl.poisson_sample_clients(5, 4, n, q).ids)
    assert not np.array_equal(first.ids, fl.poisson_sample_clients(6, 3, n, q).ids)
    real = first.ids[first.mask]
    assert np.all(np.diff(real) > 0) and real.size == first.count
    assert np.all(first.ids[~first.mask] == 0)
    counts = [fl.poisson_sample_clients(5, t, n, q).count for t in range(100)]
    # Mean of 100 Binomial(1000, 0.05) / 1000: s.e. ≈ 0.0007; allow ~7 s.e.
    assert np.mean(counts) / n == pytest.approx(q, abs=0.005)


def test_poisson_cap_bound_and_refusal():
    from scipy.stats import binom

    n, q, p = 500, 0.02, 1e-12
    cap = fl.poisson_max_clients(n, q, p)
    assert binom.sf(cap, n, q) <= p < binom.sf(cap - 1, n, q)
    with pytest.raises(ValueError, match="refusing to truncate"):
        fl.poisson_sample_clients(0, 0, n, 0.5, max_clients=10)
