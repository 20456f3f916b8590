import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rodflow_jax as rf
from helpers import optax_counterparts, optax_params, flat, lr_for, tiny_mlp

OPTAX = optax_counterparts()


def _run_ours(opt, loss, params, n):
    phase, slow = opt.init(params)
    step = jax.jit(lambda z, s: opt.step(z, s, jax.grad(loss)(z.params)))
    out = []
    for _ in range(n):
        phase, slow = step(phase, slow)
        out.append(flat(phase.params))
    return np.array(out)


@pytest.mark.parametrize("name", sorted(OPTAX))
@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
def test_matches_optax_step_for_step(name, dtype, rtol):
    loss, params = tiny_mlp(dtype=dtype)
    lr = lr_for(name)
    ours = _run_ours(rf.make_optimizer(name, learning_rate=lr), loss, params, 120)
    ref = optax_params(OPTAX[name](lr), loss, params, 120)[1:]
    assert ours.dtype == np.dtype(dtype)
    scale = np.abs(ref).max(axis=1, keepdims=True)
    np.testing.assert_array_less(np.abs(ours - ref) / scale, rtol)


@pytest.mark.parametrize("name", ["gd", "adam", "rmsprop"])
def test_schedule_matches_optax(name):
    loss, params = tiny_mlp()
    lr0 = lr_for(name)
    sched = lambda count: lr0 / (1.0 + 0.02 * count)  # noqa: E731
    ours = _run_ours(rf.make_optimizer(name, learning_rate=sched), loss, params, 60)
    ref = optax_params(OPTAX[name](sched), loss, params, 60)[1:]
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_a_schedule_runs_through_the_drivers():
    """From the stop-43 API QA pass: a schedule (README: 'a learning rate may also be a schedule')
    crashed ``run_discrete`` and ``compare``, whose batch of one tried to make the callable an array.
    The rollout now equals optax's steps and compare runs its flows."""
    loss, params = tiny_mlp()
    sched = lambda count: 0.3 / (1.0 + 0.02 * count)  # noqa: E731
    run = rf.run_discrete(rf.make_optimizer("gd", learning_rate=sched), loss, params, 30)
    ref = optax_params(OPTAX["gd"](sched), loss, params, 30)
    np.testing.assert_allclose(np.stack([flat(run.state_at(k)[0].params) for k in range(31)]), ref, rtol=1e-10,
                               atol=1e-12)
    c = rf.compare(loss, params, rf.make_optimizer("gd", learning_rate=sched), 30, start_step=0,
                   models="discrete,rod", progress=False)
    assert np.isfinite(c.metrics["rod"]["final_loss"]) and not c.metrics["rod"]["failed"]


def _scalar_reference(name, loss, params, lr, n, b1=0.9, b2=0.999, decay=0.9, eps=1e-8):
    """Independent numpy reference for the scalar-second-moment variants."""
    x0 = flat(params)
    from jax.flatten_util import ravel_pytree

    _, unravel = ravel_pytree(params)
    grad = jax.jit(lambda x: ravel_pytree(jax.grad(loss)(unravel(x)))[0])
    w, m, v = x0.copy(), np.zeros_like(x0), 0.0
    out = []
    for k in range(n):
        g = np.asarray(grad(w))
        t = k + 1
        if name == "scalar_rmsprop":
            v = decay * v + (1 - decay) * np.sum(g**2)
            w = w - lr * g / np.sqrt(v + eps)
        else:
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * np.sum(g**2)
            if name == "scalar_adam":
                mhat = m / (1 - b1**t)
            else:
                mhat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
            w = w - lr * mhat / (np.sqrt(v / (1 - b2**t)) + eps)
        out.append(w.copy())
    return np.array(out)


@pytest.mark.parametrize("name", ["scalar_rmsprop", "scalar_adam", "scalar_nadam"])
def test_scalar_variants_match_reference(name):
    loss, params = tiny_mlp()
    ours = _run_ours(rf.make_optimizer(name, learning_rate=0.01), loss, params, 100)
    ref = _scalar_reference(name, loss, params, 0.01, 100)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("scalar, full", [("scalar_rmsprop", "rmsprop"), ("scalar_adam", "adam"), ("scalar_nadam", "nadam")])
def test_scalar_equals_per_coordinate_in_one_dimension(scalar, full):
    loss = lambda w: jnp.sum(jnp.cos(w) + 0.5 * w**2)  # noqa: E731
    w0 = jnp.array([0.7])
    a = _run_ours(rf.make_optimizer(scalar, learning_rate=0.05), loss, w0, 50)
    b = _run_ours(rf.make_optimizer(full, learning_rate=0.05), loss, w0, 50)
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_adam_with_b1_zero_is_bias_corrected_rmsprop_direction():
    """Cross-check of the shared adam engine: b1=0 makes NAdam equal Adam."""
    loss, params = tiny_mlp()
    a = _run_ours(rf.make_optimizer("adam", learning_rate=0.01, b1=0.0), loss, params, 30)
    b = _run_ours(rf.make_optimizer("nadam", learning_rate=0.01, b1=0.0), loss, params, 30)
    np.testing.assert_allclose(a, b, rtol=1e-12)


# --- stability thresholds on a quadratic, slow state frozen ---------------------------------


def _frozen_growth(name, factor, count=200.0, n_steps=1500):
    """Iterate the fast map on a quadratic whose top (preconditioned) curvature is
    ``factor`` x threshold, with the slow state frozen; return |w_n|/|w_0| and the sign pattern."""
    opt = rf.make_optimizer(name, learning_rate=0.1, momentum=0.9) if name in ("heavy_ball", "nesterov") else (
        rf.make_optimizer(name, learning_rate=0.1)
    )
    d = 3
    w0 = jnp.ones(d)
    phase, slow = opt.init(w0)
    nu = jnp.array([0.5, 2.0, 1.0]) if not getattr(opt, "scalar", False) else jnp.asarray(1.7)
    slow = rf.Slow(jnp.asarray(count), None if slow.nu is None else nu)
    new_slow = rf.Slow(slow.count + 1, slow.nu)
    p = opt.preconditioner(new_slow)
    p = jnp.ones(d) if p is None else jnp.broadcast_to(p, (d,))
    thr = opt.threshold(slow)
    # curvature h_i such that (P^-1 H)_ii = [0.2, 0.5, factor] * thr
    h = jnp.array([0.2, 0.5, factor]) * thr * p
    loss = lambda w: 0.5 * jnp.sum(h * w**2)  # noqa: E731
    step = jax.jit(lambda z: opt.fast_map(z, jax.grad(loss)(z.params), slow, new_slow))
    ws = []
    for _ in range(n_steps):
        phase = step(phase)
        ws.append(float(phase.params[2]))
    ws = np.array(ws)
    return abs(ws[-1]) / abs(ws[-201]), np.sign(ws[-200:])


def test_threshold_decay_and_growth(optimizer_name):
    grow_ratio, signs = _frozen_growth(optimizer_name, 1.03)
    decay_ratio, _ = _frozen_growth(optimizer_name, 0.97)
    assert grow_ratio > 1.0, "iterates should grow just above the threshold"
    assert decay_ratio < 1.0, "iterates should decay just below the threshold"
    # the unstable mode flips sign every step (period-2 oscillation)
    assert np.all(signs[1:] == -signs[:-1])


@pytest.mark.parametrize("name", ["adam", "nadam", "scalar_adam"])
def test_bias_corrected_threshold_early(name):
    """Early on (t = 3) the Adam-type threshold is lower; the formula must track the map."""
    assert _frozen_growth(name, 1.03, count=2.0)[0] > 1.0
    assert _frozen_growth(name, 0.97, count=2.0)[0] < 1.0


def test_threshold_values():
    assert float(rf.make_optimizer("gd", learning_rate=0.1).threshold(rf.Slow(jnp.asarray(0.0)))) == pytest.approx(20.0)
    hb = rf.make_optimizer("heavy_ball", learning_rate=0.1, momentum=0.9)
    assert float(hb.threshold(rf.Slow(jnp.asarray(0.0)))) == pytest.approx(38.0)
    nest = rf.make_optimizer("nesterov", learning_rate=0.1, momentum=0.9)
    assert float(nest.threshold(rf.Slow(jnp.asarray(0.0)))) == pytest.approx(38.0 / 2.8)
    adam = rf.make_optimizer("adam", learning_rate=0.1)
    assert float(adam.threshold(rf.Slow(jnp.asarray(1e4)))) == pytest.approx(380.0)
    nadam = rf.make_optimizer("nadam", learning_rate=0.1)
    assert float(nadam.threshold(rf.Slow(jnp.asarray(1e4)))) == pytest.approx(2 * 1.9 / (0.1 * 0.1 * 2.8))


# --- input checks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("sgd", {"learning_rate": 0.1}, "unknown optimizer 'sgd'"),
        ("adma", {"learning_rate": 0.1}, "did you mean 'adam'"),
        ("gd", {"learning_rate": -0.1}, "learning_rate must be a positive"),
        ("gd", {"learning_rate": 0.0}, "learning_rate must be a positive"),
        ("adam", {"learning_rate": 0.1, "b1": 1.0}, r"b1 must lie in \[0, 1\)"),
        ("adam", {"learning_rate": 0.1, "b2": -0.1}, r"b2 must lie in \[0, 1\)"),
        ("heavy_ball", {"learning_rate": 0.1, "momentum": 1.5}, "momentum must lie"),
        ("rmsprop", {"learning_rate": 0.1, "eps": -1.0}, "eps must be >= 0"),
        ("gd", {"learning_rate": 0.1, "b1": 0.9}, "takes no hyperparameter 'b1'"),
        ("gd", {}, "needs a learning_rate"),
    ],
)
def test_bad_hyperparameters(name, kwargs, match):
    with pytest.raises(rf.InputError, match=match):
        rf.make_optimizer(name, **kwargs)


def test_optimizer_is_a_pytree_with_traced_hyperparameters():
    """Hyperparameters are leaves: vmap over learning rates needs no recompilation per value."""
    loss, params = tiny_mlp()

    def final(lr):
        opt = rf.make_optimizer("adam", learning_rate=lr)
        z, s = opt.init(params)
        for _ in range(3):
            z, s = opt.step(z, s, jax.grad(loss)(z.params))
        return loss(z.params)

    vals = jax.vmap(final)(jnp.array([1e-3, 1e-2]))
    assert vals.shape == (2,) and bool(jnp.all(jnp.isfinite(vals)))


def test_float32_params_keep_float32_state_in_the_scan_under_x64(optimizer_name):
    """The suite runs with x64 on, as a float64 user's session would; a float32 model must still
    step in float32. A sum seeded with a float64 zero used to promote the scalar variants'
    second moment, and the scan kernel refused the carry (TypeError)."""
    loss, params = tiny_mlp(dtype=jnp.float32)
    opt = rf.make_optimizer(optimizer_name, learning_rate=lr_for(optimizer_name))
    run = rf.run_discrete(opt, loss, params, 5)
    assert not run.diverged
    for leaf in jax.tree.leaves((run.phase, run.slow)):
        assert leaf.dtype == np.float32, (optimizer_name, leaf.dtype)
    assert run.loss.dtype == np.float32
