"""Central flow: closed form, complementarity, the stable flow below the edge, the edge held."""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rodflow_jax as rf
from rodflow_jax._discrete import run_discrete
from rodflow_jax.flows import StableState, central_flow, stable_flow
from rodflow_jax.flows._central import sigma_variances, solve_psd_complementarity, sym_basis, to_mat
from helpers import flat, tiny_mlp

CENTRAL_OPTIMIZERS = ("gd", "rmsprop", "scalar_rmsprop")
LR = {"gd": 0.5, "rmsprop": 0.003, "scalar_rmsprop": 0.01}


@eqx.filter_jit
def _evaluate(flow, y):
    """The critical system, the vector field and the predicted loss: one compilation per flow."""
    sys = flow.system(y)
    return sys, flow.vector_field_from(y, sys), flow.predicted_loss_from(y, sys)


_solve = jax.jit(solve_psd_complementarity, static_argnums=3)


@functools.lru_cache(maxsize=None)
def _problem():  # one loss function object, so compiled evaluations are shared between tests
    return tiny_mlp(0, n=40, d=5, h=16, o=3)  # GD at eta = 0.5 reaches the edge near step 45


def _start(name, step=10, **kw):
    loss, params = _problem()
    opt = rf.make_optimizer(name, learning_rate=LR[name])
    run = run_discrete(opt, loss, params, step + 1)
    z0, s0 = run.state_at(step)
    _, s1 = run.state_at(step + 1)
    flow, y0 = central_flow(opt, loss, z0, s0, s1, **kw)
    return opt, loss, z0, s0, s1, flow, y0


def assert_complementary(A, b, support, x, residual, tol=1e-6):
    """X >= 0, Y = -(b + A x) >= 0 on the support, <X, Y> = 0, all relative to the data's scale."""
    k = support.shape[0]
    E = sym_basis(k, b.dtype)
    np.testing.assert_allclose(residual, -(b + A @ x), rtol=1e-10, atol=1e-12 * np.abs(b).max())
    X, Y = np.asarray(to_mat(E, x)), np.asarray(to_mat(E, residual))
    on = np.asarray(support)
    scale_x = max(np.abs(X).max(), 1e-300)
    scale_y = np.abs(b).max() + np.abs(A @ x).max()
    assert np.all(X[~on] == 0) and np.all(X[:, ~on] == 0)
    assert np.linalg.eigvalsh(X).min() >= -tol * scale_x
    if on.any():
        assert np.linalg.eigvalsh(Y[np.ix_(on, on)]).min() >= -tol * scale_y
    assert abs(np.sum(X * Y)) <= tol * scale_x * scale_y


def test_single_direction_closed_form():
    """k = 1, GD: sigma^2 = max(0, -2 <grad S, g> / ||grad S||^2), S(w) = u^T H(w) u."""
    opt, loss, z0, s0, s1, flow, y0 = _start("gd", step=40, restoring=0.0)
    lam, theta = _evaluate(flow, y0)[0].eigenvalues, opt.threshold(s0)
    # make the top direction (0.95 of the threshold here) the only active one
    flow = dataclasses.replace(flow, active_tol=1 - 0.5 * float(lam[0] + lam[1]) / float(theta))
    sys, d, _ = _evaluate(flow, y0)
    assert bool(sys.active[0]) and not bool(sys.active[1])
    u = sys.directions[:, 0]
    x, unravel = jax.flatten_util.ravel_pytree(z0.params)

    def sharp(w):
        return u @ jax.jvp(jax.grad(lambda v: loss(unravel(v))), (w,), (u,))[1]

    gs = jax.grad(sharp)(x)
    g = jax.flatten_util.ravel_pytree(jax.grad(loss)(z0.params))[0]
    closed = max(0.0, float(-2 * gs @ g / (gs @ gs)))
    assert closed > 0  # progressive sharpening at this state: a non-trivial check
    np.testing.assert_allclose(float(sys.x[0]), closed, rtol=1e-9)
    np.testing.assert_allclose(float(sigma_variances(sys)[0]), closed, rtol=1e-9)  # |u| = 1
    # and the vector field is GD on L + (closed/2) S
    expect = -opt.learning_rate * (g + 0.5 * closed * gs)
    np.testing.assert_allclose(flat(d.phase.params), expect, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_psd_complementarity_random(seed):
    """Random monotone problems, ill-scaled and slightly non-symmetric as the RMSProps' are."""
    rng = np.random.default_rng(seed)
    k = 3
    p = k * (k + 1) // 2
    G = rng.normal(size=(p + 2, p))
    N = rng.normal(size=(p, p))
    t = 10.0 ** rng.uniform(-2, 2, size=k)  # X -> T X T scales coordinate (a, b) by t_a t_b
    ia, ib = np.triu_indices(k)
    s = t[ia] * t[ib]
    A = -s[:, None] * (G.T @ G + 0.5 * (N - N.T)) * s[None, :]  # monotone, not symmetric
    b = rng.normal(size=p) * s
    support = jnp.asarray([True, True, seed % 2 == 0])
    sol = _solve(jnp.asarray(A), jnp.asarray(b), support, 200)
    assert_complementary(A, b, support, np.asarray(sol.x), np.asarray(sol.residual))


@pytest.mark.parametrize("name", CENTRAL_OPTIMIZERS)
def test_flow_system_is_complementary(name):
    """Two critical directions forced active: the solved X meets the conditions to 1e-6."""
    *_, flow, y0 = _start(name, step=40, restoring=0.0)
    flow = dataclasses.replace(flow, active_tol=1.0)  # every positive Ritz value is active
    sys = _evaluate(flow, y0)[0]
    assert bool(sys.active.all())
    A, b = np.asarray(sys.A), np.asarray(sys.b)
    assert_complementary(A, b, sys.active, np.asarray(sys.x), np.asarray(sys.residual))
    assert np.abs(sys.x).max() > 0  # the edge is not trivially inactive


@pytest.mark.parametrize("name", CENTRAL_OPTIMIZERS)
def test_below_the_edge_is_the_stable_flow(name):
    opt, loss, z0, s0, s1, flow, y0 = _start(name, step=10)
    sys, a, predicted = _evaluate(flow, y0)
    assert not bool(sys.active.any()) and np.all(np.asarray(sys.x) == 0)
    stable, ys = stable_flow(opt, loss, z0, s0, s1)
    b = stable.vector_field(0.0, StableState(*ys), None)
    np.testing.assert_allclose(flat(a.phase), flat(b[0]), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(flat(a.slow), flat(b[1]), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(float(predicted), float(loss(z0.params)), rtol=1e-14)


def test_unsupported_optimizer_is_an_input_error():
    loss, params = tiny_mlp()
    opt = rf.make_optimizer("adam", learning_rate=0.01)
    z, s = opt.init(params)
    with pytest.raises(rf.InputError, match="central flow"):
        central_flow(opt, loss, z, s, s)
    with pytest.raises(rf.InputError, match="central flow"):
        rf.compare(loss, params, opt, 10, models=["discrete", "central"])


@pytest.mark.slow
def test_compare_central_holds_the_edge_where_the_stable_flow_passes_it():
    """GD reaches the edge near step 45: from step 20 the stable flow sharpens past the
    threshold, the central flow holds it there (probed every 10 steps)."""
    loss, params = _problem()
    opt = rf.make_optimizer("gd", learning_rate=0.5)
    res = rf.compare(loss, params, opt, 81, start_step=20, models=["discrete", "stable", "central"], probe_every=10)
    m, tr = res.metrics["central"], res.trajectories
    assert not m["failed"] and not res.metrics["stable"]["failed"]
    assert m["param_rel_error_final"] is not None and "variance_window_log_error" in m
    v = tr["central_variance"]  # tr Sigma on the comparison grid (every step here)
    assert v.shape == (82,) and np.isfinite(v[20:81]).all() and np.isnan(v[81])
    assert np.isfinite(tr["central_loss"][20:81]).all()
    central = tr["central_sharpness"][:, 0] / tr["central_threshold"]
    stable = tr["stable_sharpness"][:, 0] / tr["stable_threshold"]
    assert stable[-1] > 1.15
    assert central.max() < 1.02 and central[-1] > 0.98


@pytest.mark.parametrize("options, match", [
    ({"k": 5}, r"k <= the number of parameters \(2\), got k=5"),
    ({"k": 0}, "1 <= k <= num_iter"),
    ({"k": 3, "num_iter": 2}, "1 <= k <= num_iter"),
    ({"restoring": -1.0}, "restoring rate >= 0"),
])
def test_bad_central_options_are_refused_before_the_discrete_run(options, match, monkeypatch):
    """``--central-k 5`` on a 2-parameter problem was an opt_einsum traceback after the whole
    run; now one message, before any step (the discrete rollout is never called)."""
    import rodflow_jax.experiments._evaluate as ev

    def no_run(*a, **k):
        raise AssertionError("the discrete run started")

    monkeypatch.setattr(ev, "discrete_evaluation", no_run)
    loss_fn, p0 = rf.get_problem("toy").make(0)
    with pytest.raises(rf.InputError, match=match):
        rf.compare(loss_fn, p0, rf.make_optimizer("gd", learning_rate=0.1), 20,
                   models=["discrete", "central"], flow_options={"central": options})
