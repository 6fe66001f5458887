"""Secure aggregation (deploy.secure_aggregation) without processes: the config checks, the
device's contribution, the error bound against Flower's own SecAgg+ arithmetic, and the
server step (plain, and DP with the simulation's noise). The loopback run with real
SuperNodes is in tests/test_deploy_loopback.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_fm import fl
from fedjax_fm.config import ConfigError, config_from_dict
from fedjax_fm.deploy.secure import MODULUS_RANGE, device_contribution, make_secure_server_step, plan_secure_aggregation
from fedjax_fm.fl.dp_fedavg import DPFedAvg

pytest.importorskip("flwr")

LOCAL = {"local_steps": 2, "local_epochs": None}


def _cfg(secure: dict | None = None, **federated):
    data = {"federated": {"num_clients": 5, "clients_per_round": 3, **LOCAL, **federated},
            "deploy": {"secure_aggregation": {"enabled": True, **(secure or {})}}}
    return config_from_dict(data)


def _plan(secure: dict | None = None, **federated):
    return plan_secure_aggregation(_cfg(secure, **federated))


# -- config -----------------------------------------------------------------------------


def test_defaults_resolve_to_every_sampled_device_and_a_threshold_that_allows_a_dropout():
    assert plan_secure_aggregation(config_from_dict({})) is None  # off by default
    plan = _plan()
    assert plan.num_shares is None and plan.reconstruction_threshold == 2  # 3 devices: one may drop out
    assert plan.flower_arguments(None)["num_shares"] == 1.0  # Flower's "all sampled devices"
    assert (plan.weighting, plan.max_weight) == ("examples", 1000.0)
    assert _plan(num_clients=6, clients_per_round=6).reconstruction_threshold == 4  # ceil(2/3 · 6)
    assert _plan(weighting="uniform").max_weight == 1.0  # uniform: weight 1, nothing to scale
    assert _plan().level == 2 * 8.0 / 2**22


@pytest.mark.parametrize("secure, federated, message", [
    ({"reconstruction_threshold": 4}, {}, r"reconstruction_threshold \(4\) must be below the number of shares "
                                          r"\(3, every sampled device\)"),
    ({"reconstruction_threshold": 3}, {}, r"reconstruction_threshold \(3\) must be below"),
    ({"num_shares": 4}, {}, r"num_shares \(4\) exceeds federated.clients_per_round \(3\)"),
    ({}, {"clients_per_round": 2}, r"needs federated.clients_per_round >= 3, got 2"),
    ({}, {"compression": {"name": "topk", "fraction": 0.1}}, "cannot be combined with federated.compression"),
    ({"quantization_range": 2**31}, {}, r"must stay below the modulus 2\^32"),
    ({"clipping_range": 0.5}, {"dp": {"clip_norm": 1.0, "sampling": "fixed"}}, r"clipping_range \(0.5\) must be at "
                                                                             r"least federated.dp.clip_norm \(1.0\)"),
    ({}, {"dp": {"adaptive_clipping": {"count_stddev": 2.0}}}, "adaptive_clipping is not supported"),
])
def test_settings_secagg_cannot_honour_are_refused(secure, federated, message):
    with pytest.raises(ConfigError, match=message):
        _plan(secure, **federated)


@pytest.mark.parametrize("secure, message", [
    ({"num_shares": 2}, r"num_shares must be at least 3"),
    ({"reconstruction_threshold": 1}, r"reconstruction_threshold must be at least 2"),
    ({"num_shares": 3, "reconstruction_threshold": 3}, r"must be below num_shares \(3\)"),
    ({"clipping_range": 0.0}, "clipping_range"),
    ({"quantization_range": 1}, "quantization_range must be at least 2"),
    ({"max_weight": -1.0}, "max_weight"),
    ({"enable": True}, "did you mean 'enabled'"),
])
def test_section_values_are_checked_when_loaded(secure, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(secure)


def test_deploy_refuses_dp_without_secure_aggregation_and_accepts_it_with():
    from fedjax_fm.deploy.assemble import check_deployable

    base = {"federated": {"num_clients": 3, "clients_per_round": 3, **LOCAL, "weighting": "uniform",
                          "dp": {"sampling": "fixed"}}, "model": {"tokenizer": "byt5"}}
    with pytest.raises(ConfigError, match="federated.dp needs deploy.secure_aggregation.enabled"):
        check_deployable(config_from_dict(base))
    check_deployable(config_from_dict({**base, "deploy": {"secure_aggregation": {"enabled": True}}}))


# -- the device ---------------------------------------------------------------------------


def _delta(scale: float = 1.0) -> dict:
    return {"a": np.array([3.0, -4.0], np.float32) * scale, "b": {"c": np.array([[0.5]], np.float32) * scale}}


def test_a_non_finite_update_becomes_a_zero_vector_of_weight_zero():
    bad = _delta()
    bad["a"][0] = np.nan
    c = device_contribution(bad, 5.0, _plan())
    assert (c.weight, c.finite, c.clipped_values) == (0, False, 0)
    assert all(not np.any(x) for x in jax.tree.leaves(c.update))
    assert device_contribution(_delta(), 0.0, _plan()).weight == 0  # no example: no weight (as fl.aggregate)


def test_weights_and_dp_clipping_on_the_device():
    plain = device_contribution(_delta(), 5.0, _plan())
    assert plain.weight == 5 and plain.update["a"].dtype == np.float64
    np.testing.assert_array_equal(plain.update["a"], _delta()["a"])
    assert device_contribution(_delta(), 5.0, _plan(weighting="uniform")).weight == 1
    dp = _plan(weighting="uniform", num_clients=3, dp={"clip_norm": 1.0, "sampling": "fixed"})
    clipped = device_contribution(_delta(), 5.0, dp)
    assert clipped.weight == 1
    norm = np.sqrt(sum(float(np.sum(x**2)) for x in jax.tree.leaves(clipped.update)))
    assert norm == pytest.approx(1.0, rel=1e-6)  # clipped to C, as fl.clip_deltas does in simulation
    expected, _ = fl.clip_deltas(jax.tree.map(lambda x: jnp.asarray(x)[None], _delta()), jnp.float32(1.0))
    np.testing.assert_allclose(clipped.update["a"], np.asarray(expected["a"][0]), rtol=1e-7)


def test_values_beyond_the_clipping_range_are_counted():
    plan = _plan({"clipping_range": 3.5}, weighting="uniform")
    assert device_contribution(_delta(), 5.0, plan).clipped_values == 1  # |-4| > 3.5
    assert device_contribution(_delta(), 5.0, _plan()).clipped_values == 0


# -- the bound, against Flower's SecAgg+ arithmetic ---------------------------------------


def _flower_secagg_mean(updates: list[list[np.ndarray]], weights: list[int], plan) -> list[np.ndarray]:
    """What SecAgg+ reveals to the server: the device side of ``secaggplus_mod._collect_masked_vectors``
    and the server side of ``SecAggPlusWorkflow.unmask_stage``, with pairwise masks that cancel."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (factor_combine, factor_extract,
                                                                    parameters_addition, parameters_mod,
                                                                    parameters_multiply, parameters_subtraction)
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    rng = np.random.default_rng(0)
    shapes = [(1,)] + [u.shape for u in updates[0]]
    masks = [[rng.integers(0, MODULUS_RANGE, s) for s in shapes] for _ in updates]  # device k adds m_k, k+1 subtracts
    vectors = []
    for k, (update, weight) in enumerate(zip(updates, weights)):
        q_ratio = round(weight / plan.max_weight * plan.quantization_range)
        scaled = parameters_multiply(update, q_ratio / plan.quantization_range)
        quantized = factor_combine(q_ratio, quantize(scaled, plan.clipping_range, plan.quantization_range))
        quantized = parameters_subtraction(parameters_addition(quantized, masks[k]), masks[k - 1])
        vectors.append(parameters_mod(quantized, MODULUS_RANGE))
    total = vectors[0]
    for v in vectors[1:]:
        total = parameters_addition(total, v)
    q_total, summed = factor_extract(parameters_mod(total, MODULUS_RANGE))
    mean = dequantize(summed, plan.clipping_range, plan.quantization_range)
    return [(x - (len(updates) - 1) * plan.clipping_range) * (plan.quantization_range / q_total) for x in mean]


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_secagg_mean_is_within_the_stated_bound(weighting):
    plan = _plan({"clipping_range": 1.0, "quantization_range": 2**12, "max_weight": 10.0}, weighting=weighting)
    rng = np.random.default_rng(1)
    deltas = [[rng.uniform(-0.3, 0.3, (50, 4))] for _ in range(3)]
    contributions = [device_contribution({"x": d[0].astype(np.float32)}, n, plan) for d, n in zip(deltas, (5, 7, 6))]
    weights = [c.weight for c in contributions]
    got = _flower_secagg_mean([[c.update["x"]] for c in contributions], weights, plan)[0]
    a = np.array([plan.quantized_weight(w) for w in weights])
    want = sum(ak * c.update["x"] for ak, c in zip(a, contributions)) / a.sum()  # the a_k-weighted mean
    bound = plan.error_bound(3, float(a.sum()))
    error = np.max(np.abs(got - want))
    assert 0 < error < bound  # quantisation is visible, and within n·(2c/Q)/Σa_k
    assert bound == pytest.approx(3 * plan.level / a.sum())
    if weighting == "uniform":
        assert bound == pytest.approx(plan.level)  # n / n_valid = 1


# -- the server step ----------------------------------------------------------------------


def _no_clients(*args):  # the server step never runs the client update
    raise AssertionError("not called")


def test_plain_server_step_applies_the_mean_and_respects_min_clients():
    params = {"w": jnp.ones([3], jnp.float32)}
    algorithm = fl.FederatedAlgorithm(_no_clients, fl.fedavg(1.0))
    state = algorithm.init(params, 0)
    step = make_secure_server_step(algorithm.server_optimizer, min_clients=2)
    mean = {"w": jnp.array([0.5, -1.0, 0.25], jnp.float32)}
    new, metrics = step(state, mean, 2)
    np.testing.assert_allclose(new.params["w"], [0.5, 2.0, 0.75])  # x - g
    assert bool(metrics["applied"]) and int(new.round) == 1
    kept, metrics = step(state, {"w": jnp.full([3], jnp.nan)}, 1)  # one valid device < min_clients=2
    np.testing.assert_array_equal(kept.params["w"], params["w"])
    assert not bool(metrics["applied"]) and int(kept.round) == 1


def test_dp_server_step_adds_the_simulations_noise_to_the_sum():
    """Clipped updates summed by SecAgg (here: exactly) and noised by the server give the
    parameters DP-FedAvg's simulation gives for the same updates, seed and round."""
    C, z, K = 1.0, 0.8, 3.0
    params = {"w": jnp.zeros([4], jnp.float32), "v": jnp.zeros([2, 2], jnp.float32)}
    base = fl.FederatedAlgorithm(_no_clients, fl.fedavg(1.0))
    dp = DPFedAvg(_no_clients, base.server_optimizer, fl.dp_fedavg_aggregator(C, z, K))
    state = dp.init(params, 7)
    rng = np.random.default_rng(3)
    deltas = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "v": jnp.asarray(rng.normal(size=(3, 2, 2)),
                                                                                       jnp.float32)}
    outputs = fl.ClientOutputs(deltas, jnp.ones([3], jnp.float32), {})
    want, want_metrics = dp.server_update(state, outputs)
    clipped, _ = fl.clip_deltas(deltas, jnp.float32(C))
    mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), clipped)  # what SecAgg+ reveals (uniform weights)
    step = make_secure_server_step(dp.server_optimizer, min_clients=1, noise_multiplier=z, expected_clients=K)
    got, metrics = step(state, mean, 3)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6), got.params, want.params)
    assert float(metrics["noise_stddev"]) == pytest.approx(float(want_metrics["noise_stddev"]))
    assert bool(metrics["applied"]) and int(got.round) == 1
    # No valid device: the round still releases pure noise (always applied, as in simulation).
    empty, metrics = step(state, jax.tree.map(lambda x: jnp.full(x.shape, jnp.nan), params), 0)
    assert bool(metrics["applied"]) and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(empty.params))


def test_bare_arrays_round_trip_in_leaf_order():
    from fedjax_fm.deploy.wire import WireError, decode_leaves, encode_leaves

    tree = {"b": np.ones([2], np.float32), "a": np.arange(6, dtype=np.float32).reshape(2, 3)}
    sent = encode_leaves(tree)
    assert len(sent.tensors) == 2  # no header: what secaggplus_mod reads with parameters_to_ndarrays
    got = decode_leaves(sent, tree)
    assert got["a"].dtype == np.float32
    np.testing.assert_array_equal(got["a"], tree["a"])
    with pytest.raises(WireError, match=r"has shape \[2, 3\], expected \[3, 2\]"):
        decode_leaves(sent, {"b": tree["b"], "a": np.zeros([3, 2], np.float32)})
