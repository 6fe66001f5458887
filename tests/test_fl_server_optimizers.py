"""Every server optimiser against a hand-written NumPy version of its formula, over several rounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_fm import fl

LR, B1, B2, TAU, WD, MOM = 0.05, 0.9, 0.99, 1e-3, 0.1, 0.8
ROUNDS = 6


def pseudo_gradients(shape=(3, 4), seed=0):
    """Pseudo-gradients of varying scale, so Yogi's sign(v − g²) takes both signs."""
    rng = np.random.default_rng(seed)
    scales = [1.0, 0.01, 0.5, 2.0, 1e-3, 0.1]
    return [scales[t % len(scales)] * rng.normal(size=shape) for t in range(ROUNDS)]


def reference(name, variant, x0, grads):
    """NumPy float64 transcription of each docstring formula: x_{t+1} from x_t and g_t."""
    x = x0.astype(np.float64).copy()
    m = np.zeros_like(x)
    if variant == "reddi":
        v = np.full_like(x, TAU**2)
    elif name == "fedyogi":
        m = np.full_like(x, 1e-6)
        v = np.full_like(x, 1e-6)
    elif name == "fedadagrad":
        v = np.full_like(x, 0.1)
    else:
        v = np.zeros_like(x)
    for t, g in enumerate(grads, start=1):
        if name == "fedavg":
            x = x - LR * g
        elif name == "fedavgm":
            m = MOM * m + g
            x = x - LR * m
        elif variant == "reddi":
            m = B1 * m + (1 - B1) * g
            if name in ("fedadam", "fedadamw"):
                v = B2 * v + (1 - B2) * g**2
            elif name == "fedyogi":
                v = v - (1 - B2) * g**2 * np.sign(v - g**2)
            elif name == "fedadagrad":
                v = v + g**2
            step = m / (np.sqrt(v) + TAU)
            if name == "fedadamw":
                step = step + WD * x
            x = x - LR * step
        elif name == "fedadagrad":  # optax.adagrad: no momentum, ε inside the root
            v = v + g**2
            x = x - LR * g / np.sqrt(v + TAU)
        else:  # optax adam / adamw / yogi: bias-corrected moments
            m = B1 * m + (1 - B1) * g
            if name == "fedyogi":
                v = v - (1 - B2) * np.sign(v - g**2) * g**2
            else:
                v = B2 * v + (1 - B2) * g**2
            m_hat, v_hat = m / (1 - B1**t), v / (1 - B2**t)
            step = m_hat / (np.sqrt(v_hat) + TAU)
            if name == "fedadamw":
                step = step + WD * x
            x = x - LR * step
    return x


def build(name, variant):
    kwargs = {"learning_rate": LR}
    if name == "fedavgm":
        kwargs["momentum"] = MOM
    if name in ("fedadam", "fedadamw", "fedyogi"):
        kwargs.update(b1=B1, b2=B2, tau=TAU, variant=variant)
    if name == "fedadagrad":
        kwargs.update(b1=B1, tau=TAU, variant=variant)
    if name == "fedadamw":
        kwargs["weight_decay"] = WD
    return fl.server_optimizer(name, **kwargs)


CASES = [("fedavg", "-"), ("fedavgm", "-")] + [
    (name, variant) for name in ("fedadam", "fedadamw", "fedyogi", "fedadagrad") for variant in ("reddi", "optax")
]


@pytest.mark.parametrize("name,variant", CASES, ids=[f"{n}-{v}" for n, v in CASES])
def test_server_optimizer_matches_numpy_formula(name, variant):
    x0 = np.random.default_rng(1).normal(size=(3, 4))
    grads = pseudo_gradients()
    tx = build(name, variant)
    params = {"x": jnp.asarray(x0, jnp.float32)}
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p)))
    for g in grads:
        params, state = step(params, state, {"x": jnp.asarray(g, jnp.float32)})
    expected = reference(name, variant, x0, grads)
    np.testing.assert_allclose(np.asarray(params["x"]), expected, rtol=2e-5, atol=2e-6)


def test_yogi_reference_exercises_both_signs():
    """Guard for the test above: the chosen pseudo-gradients flip sign(v − g²)."""
    v, signs = TAU**2, set()
    for g in pseudo_gradients():
        signs.update(np.unique(np.sign(v - g**2)).tolist())
        v = v - (1 - B2) * g**2 * np.sign(v - g**2)
    assert {-1.0, 1.0} <= signs


def test_fedavg_is_the_client_mean_and_reddi_differs_from_optax():
    params = {"x": jnp.ones((2,))}
    g = {"x": jnp.asarray([0.25, -0.5])}
    tx = fl.fedavg()
    u, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, u)["x"], [0.75, 1.5])
    reddi, stock = fl.fedadam(variant="reddi"), fl.fedadam(variant="optax")
    u_r, _ = reddi.update(g, reddi.init(params), params)
    u_o, _ = stock.update(g, stock.init(params), params)
    assert not np.allclose(u_r["x"], u_o["x"])  # bias correction: first optax step is ~η·sign(g)


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown server optimiser 'fedsgd'"):
        fl.server_optimizer("fedsgd")
    with pytest.raises(TypeError, match="fedavg"):
        fl.server_optimizer("fedavg", tau=1e-3)
    with pytest.raises(ValueError, match="variant"):
        fl.server_optimizer("fedadam", variant="adam")
    assert set(fl.SERVER_OPTIMIZERS) == {"fedavg", "fedavgm", "fedadam", "fedadamw", "fedyogi", "fedadagrad"}


def test_cosine_server_learning_rate_known_values_and_errors():
    assert fl.server_learning_rate(0.1) == 0.1
    schedule = fl.server_learning_rate(0.1, "cosine", 8, final_fraction=0.2)
    expected = {0: 0.1, 2: 0.1 * (0.2 + 0.8 * (1 + np.cos(np.pi / 4)) / 2), 4: 0.1 * 0.6, 8: 0.02, 12: 0.02}
    for t, eta in expected.items():
        np.testing.assert_allclose(float(schedule(t)), eta, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        fl.server_learning_rate(0.1, "linear", 8)
    with pytest.raises(ValueError, match="total_steps"):
        fl.server_learning_rate(0.1, "cosine", 0)
    with pytest.raises(ValueError, match="final_fraction"):
        fl.server_learning_rate(0.1, "cosine", 8, final_fraction=1.5)


@pytest.mark.parametrize("variant", ["reddi", "optax"])
def test_cosine_schedule_scales_each_applied_server_step(variant):
    """Under the schedule every server step is η_t / η times the constant-rate step (the
    same optimiser state otherwise), for each optimiser form; a skipped round
    (``apply_pseudo_gradient`` with ``applied`` false) neither moves the parameters nor
    advances the schedule."""
    grads = [{"x": jnp.asarray(g, jnp.float32)} for g in pseudo_gradients()]
    eta = fl.server_learning_rate(LR, "cosine", 4, final_fraction=0.0)
    for name in ("fedavg", "fedadam", "fedyogi"):
        kwargs = {} if name == "fedavg" else {"variant": variant}
        constant = fl.server_optimizer(name, learning_rate=LR, **kwargs)
        scheduled = fl.server_optimizer(name, learning_rate=eta, **kwargs)
        params = {"x": jnp.ones((3, 4))}
        s_c = constant.init(params)
        state = fl.ServerState(params, scheduled.init(params), jnp.int32(0), jax.random.PRNGKey(0))
        applied_steps = 0
        for t, g in enumerate(grads):
            if t == 1:  # a skipped round
                after = fl.apply_pseudo_gradient(scheduled, state, g, jnp.asarray(False))
                np.testing.assert_array_equal(after.params["x"], state.params["x"])
                same = jax.tree.map(lambda a, b: np.array_equal(a, b), after.opt_state, state.opt_state)
                assert all(jax.tree.leaves(same)), f"{name}: a skipped round changed the optimiser state"
                state = after
                continue
            u_c, s_c = constant.update(g, s_c, params)
            after = fl.apply_pseudo_gradient(scheduled, state, g, jnp.asarray(True))
            ratio = float(eta(applied_steps)) / LR
            np.testing.assert_allclose(after.params["x"] - state.params["x"], ratio * u_c["x"], rtol=2e-5, atol=1e-7,
                                       err_msg=f"{name} step {t}")
            state, applied_steps = after, applied_steps + 1
        assert applied_steps == len(grads) - 1 and int(state.round) == len(grads)
