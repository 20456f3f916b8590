"""The inertial (second-order) rod flow of the momentum methods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rodflow_jax as rf
from rodflow_jax._discrete import run_discrete
from rodflow_jax.flows import InertialState, inertial_flow, make_flow
from helpers import flat, tiny_mlp

MOMENTUM = ("heavy_ball", "nesterov")
VELOCITY_FORMS = MOMENTUM + ("adam", "nadam", "scalar_adam", "scalar_nadam")  # b1 is the Adam family's momentum


def _run(name, beta, steps=14):
    loss, params = tiny_mlp()
    if name in MOMENTUM:
        opt = rf.make_optimizer(name, learning_rate=0.1, momentum=beta)
    else:
        opt = rf.make_optimizer(name, learning_rate=0.01, b1=beta)
    return opt, loss, run_discrete(opt, loss, params, steps)


@pytest.mark.parametrize("name", VELOCITY_FORMS)
def test_momentum_from_velocity_continues_the_run(name):
    """m_k rebuilt from w_k - w_{k-1} is the optimizer's own m_k."""
    opt, loss, run = _run(name, 0.7)
    W, M = run.params, run.phase.momentum
    for k in (3, 9):
        v = jax.tree.map(lambda x: jnp.asarray(x[k] - x[k - 1]), W)
        w = jax.tree.map(lambda x: jnp.asarray(x[k]), W)
        m = opt.momentum_from_velocity(w, v, run.state_at(k)[1], jax.grad(loss))
        np.testing.assert_allclose(flat(m), flat(jax.tree.map(lambda x: x[k], M)), rtol=1e-10, atol=1e-12)


def _true_state(run, k, slow):
    """The inertial state of the discrete run at an even step k, velocities as backward steps."""
    w = [jax.tree.map(lambda x: jnp.asarray(x[j]), run.params) for j in range(k - 1, k + 3)]

    def rod(j):  # (c_j, rho_j) from w_j, w_{j+1}; rho_j = (-1)^j (w_{j+1} - w_j)/2 with k even
        a, b = w[j - (k - 1)], w[j + 1 - (k - 1)]
        sign = 1.0 if j % 2 == 0 else -1.0
        return jax.tree.map(lambda x, y: 0.5 * (x + y), a, b), jax.tree.map(lambda x, y: sign * 0.5 * (y - x), a, b)

    (c0, r0), (c1, r1), (c2, r2) = rod(k - 1), rod(k), rod(k + 1)
    sub = lambda a, b: jax.tree.map(jnp.subtract, a, b)  # noqa: E731
    state = InertialState(c1, r1, sub(c1, c0), sub(r1, r0), slow)
    return state, sub(c2, c1), sub(r2, r1)


@pytest.mark.parametrize("name", MOMENTUM)
def test_velocity_map_is_the_exact_rod_map(name):
    """On a true pair of iterates the discrete map gives the next rod's velocities exactly:
    the sign conventions of rho, the endpoint velocities and the flip are all checked here."""
    opt, loss, run = _run(name, 0.9)
    k = 8
    flow, _ = inertial_flow(opt, loss, *run.state_at(k), *run.state_at(k + 1))
    y, uc_next, ur_next = _true_state(run, k, flow.scaled(run.state_at(k)[1]))
    new_uc, new_ur, _ = flow.velocity_map(y)
    np.testing.assert_allclose(flat(new_uc), flat(uc_next), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(flat(new_ur), flat(ur_next), rtol=1e-9, atol=1e-12)
    assert np.abs(flat(new_ur)).max() > 1e-6  # the rod is not trivially zero


@pytest.mark.parametrize("name", VELOCITY_FORMS)
def test_orientation_symmetry_and_stable_limit(name):
    opt, loss, run = _run(name, 0.9)
    flow, y = inertial_flow(opt, loss, *run.state_at(8), *run.state_at(9))
    neg = jax.tree.map(jnp.negative, (y.half, y.half_velocity))
    a = flow.vector_field(0.0, y, None)
    b = flow.vector_field(0.0, y._replace(half=neg[0], half_velocity=neg[1]), None)
    for i in (0, 2):
        np.testing.assert_allclose(flat(a[i]), flat(b[i]), rtol=1e-12, atol=1e-15)
    for i in (1, 3):
        np.testing.assert_allclose(flat(a[i]), -flat(b[i]), rtol=1e-12, atol=1e-15)
    # rho = u_rho = 0 is invariant, and there the rod flow is the inertial stable flow
    stable, ys = make_flow("inertial_stable", opt, loss, *run.state_at(8), *run.state_at(9))
    assert isinstance(stable, rf.InertialStableFlow) and np.all(flat(ys.half) == 0) and np.all(flat(ys.half_velocity) == 0)
    zero = y._replace(half=ys.half, half_velocity=ys.half_velocity)
    d_rod, d_stable = flow.vector_field(0.0, zero, None), stable.vector_field(0.0, zero, None)
    for i in range(4):
        np.testing.assert_allclose(flat(d_rod[i]), flat(d_stable[i]), rtol=1e-12, atol=1e-15)
    assert np.all(flat(d_rod.half_velocity) == 0)


def _linear_rates(name, beta, eta_lambda, part):
    """Eigenvalues of the inertial flow linearised on L = lambda w^2 / 2 (one coordinate) in
    the centre block (c, u_c) or the rod block (rho, u_rho)."""
    eta = 0.1
    lam = eta_lambda / eta
    opt = rf.make_optimizer(name, learning_rate=eta, momentum=beta)
    loss = lambda w: 0.5 * lam * jnp.sum(w**2)  # noqa: E731
    z = rf.Phase(jnp.zeros(1), jnp.zeros(1))
    s = rf.Slow(jnp.zeros(()), None)
    flow, y = inertial_flow(opt, loss, z, s, z, s)

    def f(x):
        x2 = jnp.zeros(2)
        if part == "centre":
            st = y._replace(centre=x[:1], centre_velocity=x[1:], half=x2[:1], half_velocity=x2[1:])
            d = flow.vector_field(0.0, st, None)
            return jnp.concatenate([d.centre, d.centre_velocity])
        st = y._replace(centre=x2[:1], centre_velocity=x2[1:], half=x[:1], half_velocity=x[1:])
        d = flow.vector_field(0.0, st, None)
        return jnp.concatenate([d.half, d.half_velocity])

    return np.linalg.eigvals(np.asarray(jax.jacfwd(f)(jnp.zeros(2))))


@pytest.mark.parametrize("eta_lambda", [0.5, 1.9, 3.0])
def test_heavy_ball_bulk_modes_decay_at_the_discrete_rate(eta_lambda):
    """Underdamped modes decay by sqrt(beta) per step, as the optimizer's do; the first-order
    stable flow decays them at 1 - sqrt(beta) cos(theta) (for eta lambda = 1.9: ~1 per step)."""
    beta = 0.9
    rates = _linear_rates("heavy_ball", beta, eta_lambda, "centre")
    assert np.all(np.abs(rates.imag) > 0), "these modes are underdamped"
    np.testing.assert_allclose(rates.real, 0.5 * np.log(beta), rtol=1e-10)


@pytest.mark.parametrize("name", MOMENTUM)
@pytest.mark.parametrize("beta", [0.5, 0.9])
def test_rod_grows_exactly_past_the_threshold(name, beta):
    eta = 0.1
    opt = rf.make_optimizer(name, learning_rate=eta, momentum=beta)
    thr = float(opt.threshold(rf.Slow(jnp.zeros(()), None))) * eta  # eta * lambda at the edge
    below = _linear_rates(name, beta, 0.97 * thr, "rod").real.max()
    above = _linear_rates(name, beta, 1.03 * thr, "rod").real.max()
    assert below < 0 < above


def test_unsupported_optimizers_are_refused():
    loss, params = tiny_mlp()
    for opt in (rf.make_optimizer("rmsprop", learning_rate=0.01), rf.make_optimizer("gd", learning_rate=0.1)):
        z, s = opt.init(params)
        with pytest.raises(rf.InputError, match="momentum methods"):
            make_flow("inertial", opt, loss, z, s, z, s)
        with pytest.raises(rf.InputError, match="momentum methods"):
            rf.compare(loss, params, opt, 10, models=("discrete", "inertial"))
    opt = rf.make_optimizer("heavy_ball", learning_rate=0.1, momentum=0.0)
    z, s = opt.init(params)
    with pytest.raises(rf.InputError, match="momentum > 0"):
        make_flow("inertial_stable", opt, loss, z, s, z, s)


@pytest.mark.slow
def test_inertial_rod_beats_the_first_order_rod_on_heavy_ball():
    """Deep linear net, heavy ball at its default (momentum 0.5): measured final errors 8e-4
    (inertial) against 6.2e-3 (rod) at 600 steps; here 300 steps keep CI short."""
    problem = rf.get_problem("deep-linear")
    loss, params = problem.make(0)
    opt = rf.make_optimizer("heavy_ball", learning_rate=problem.learning_rates["heavy_ball"], momentum=0.5)
    cmp = rf.compare(loss, params, opt, 300, models=("discrete", "rod1", "inertial"), probe_every=50)
    rod, inertial = cmp.metrics["rod1"], cmp.metrics["inertial"]
    assert not inertial["failed"]
    assert inertial["param_rel_error_final"] * 3 < rod["param_rel_error_final"]
    assert abs(inertial["sharpness_ratio_final"] - 1) < 0.05
