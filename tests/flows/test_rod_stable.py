import jax
import jax.numpy as jnp
import numpy as np

import rodflow_jax as rf
from rodflow_jax._discrete import run_discrete
from rodflow_jax._integrate import default_solver, integrate
from rodflow_jax.flows import RodState, StableState, rod_flow, stable_flow
from helpers import flat, lr_for, tiny_mlp


def _make(name, **kw):
    return rf.make_optimizer(name, learning_rate=lr_for(name), **kw)


def _start(name, steps=12):
    loss, params = tiny_mlp()
    opt = _make(name)
    run = run_discrete(opt, loss, params, steps)
    z0, s0 = run.state_at(steps - 2)
    z1, s1 = run.state_at(steps - 1)
    return opt, loss, z0, s0, z1, s1


def test_zero_half_vector_is_the_stable_flow(optimizer_name):
    opt, loss, z0, s0, z1, s1 = _start(optimizer_name)
    rod, y = rod_flow(opt, loss, z0, s0, z1, s1)
    stable, _ = stable_flow(opt, loss, z0, s0, s1)
    y0 = RodState(y.centre, jax.tree.map(jnp.zeros_like, y.half), y.slow)
    d_rod = rod.vector_field(0.0, y0, None)
    d_stable = stable.vector_field(0.0, StableState(y.centre, y.slow), None)
    np.testing.assert_allclose(flat(d_rod.centre), flat(d_stable[0]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(flat(d_rod.slow), flat(d_stable[1]), rtol=1e-12, atol=1e-14)
    assert np.all(flat(d_rod.half) == 0.0), "r = 0 must be invariant"


def test_zero_half_vector_integrates_to_the_stable_flow():
    opt, loss, z0, s0, z1, s1 = _start("adam")
    rod, y = rod_flow(opt, loss, z0, s0, z1, s1)
    y0 = RodState(y.centre, jax.tree.map(jnp.zeros_like, y.half), y.slow)
    stable, _ = stable_flow(opt, loss, y.centre, rod.slow(y), s1)
    stable = type(stable)(opt, loss, rod.scale)  # same scaling, so the states compare directly
    a = integrate(rod, y0, 10, 30)
    # the same solver for both (Adam's stable flow defaults to the implicit Kvaerno5, whose
    # third-order Hermite dense output is ~2e-6 off between its long steps here: a solver
    # difference, not a flow difference)
    b = integrate(stable, StableState(y.centre, y.slow), 10, 30, config=default_solver(rod, jnp.float64))
    # the two solves take different adaptive steps: agreement is at the solver tolerance
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-7)
    np.testing.assert_allclose(flat(a.centre), flat(b.centre), rtol=1e-6, atol=1e-8)


def test_rod_orientation_symmetry(optimizer_name):
    """(c, r) and (c, -r) are the same rod: r -> -r maps the vector field to itself flipped."""
    opt, loss, z0, s0, z1, s1 = _start(optimizer_name)
    rod, y = rod_flow(opt, loss, z0, s0, z1, s1)
    flipped = RodState(y.centre, jax.tree.map(jnp.negative, y.half), y.slow)
    a = rod.vector_field(0.0, y, None)
    b = rod.vector_field(0.0, flipped, None)
    np.testing.assert_allclose(flat(a.centre), flat(b.centre), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(flat(a.half), -flat(b.half), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(flat(a.slow), flat(b.slow), rtol=1e-12, atol=1e-15)
    assert np.abs(flat(a.half)).max() > 0  # not trivially symmetric


def test_rod_solutions_map_to_solutions_under_flip():
    opt, loss, z0, s0, z1, s1 = _start("gd", steps=30)
    rod, y = rod_flow(opt, loss, z0, s0, z1, s1)
    flipped = RodState(y.centre, jax.tree.map(jnp.negative, y.half), y.slow)
    a = integrate(rod, y, 0, 20)
    b = integrate(rod, flipped, 0, 20)
    np.testing.assert_allclose(flat(a.centre), flat(b.centre), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.half_norm, b.half_norm, rtol=1e-9)


def _r_jacobian_max_real_eig(name, factor):
    """Largest real part of d(dr/dt)/dr at r = 0 on a quadratic whose top (preconditioned)
    curvature is ``factor`` x the optimizer's threshold (centre at the minimum)."""
    opt = _make(name)
    d = 3
    w = jnp.zeros(d)
    phase, slow = opt.init(w)
    scalar = getattr(opt, "scalar", False)
    nu = None if slow.nu is None else (jnp.asarray(1.3) if scalar else jnp.array([0.5, 2.0, 1.0]))
    slow = rf.Slow(jnp.asarray(150.0), nu)
    # P exactly as the rod's endpoints see it: S(s, g) at the minimum, where g = 0
    p = opt.preconditioner(opt.slow_map(slow, jnp.zeros(d)))
    p = jnp.ones(d) if p is None else jnp.broadcast_to(p, (d,))
    h = jnp.array([0.3, 0.6, factor]) * opt.threshold(slow) * p
    loss = lambda x: 0.5 * jnp.sum(h * x**2)  # noqa: E731
    rod, _ = rod_flow(opt, loss, phase, slow, phase, slow)
    ys = rod.scaled(slow)

    def dr(half):
        return rod.vector_field(0.0, RodState(phase, half, ys), None).half

    leaves, unravel = jax.flatten_util.ravel_pytree(jax.tree.map(jnp.zeros_like, phase))
    jac = jax.jacfwd(lambda v: jax.flatten_util.ravel_pytree(dr(unravel(v)))[0])(leaves)
    return float(np.max(np.linalg.eigvals(np.asarray(jac)).real))


def test_rod_grows_exactly_above_threshold(optimizer_name):
    assert _r_jacobian_max_real_eig(optimizer_name, 1.03) > 0
    assert _r_jacobian_max_real_eig(optimizer_name, 0.97) < 0


def test_gd_rod_half_vector_grows_above_threshold_when_integrated():
    lr = 0.1
    for factor, grows in [(1.03, True), (0.97, False)]:
        h = jnp.array([1.0, factor * 2 / lr])
        loss = lambda x, h=h: 0.5 * jnp.sum(h * x**2)  # noqa: E731
        opt = rf.make_optimizer("gd", learning_rate=lr)
        z0 = rf.Phase(jnp.array([1.0, 1e-3]))
        z1 = opt.step(z0, opt.init(z0.params)[1], jax.grad(loss)(z0.params))[0]
        s = opt.init(z0.params)[1]
        rod, y = rod_flow(opt, loss, z0, s, z1, rf.Slow(s.count + 1))
        out = integrate(rod, y, 0, 200)
        assert (out.half_norm[-1] > out.half_norm[100]) == grows


def test_gd_rod_sits_on_exact_period_two_orbit():
    """L(x, y) = lam log cosh x + mu y^2/2 with eta lam > 2 has the GD orbit x = +-a, y = 0,
    lam tanh(a) = 2a/eta. The rod (c, r) = (0, a e_x) is a fixed point of the rod flow,
    and the rod started from GD's own iterates converges to it."""
    lam, mu, eta = 1.0, 0.5, 2.5
    loss = lambda w: lam * jnp.log(jnp.cosh(w[0])) + 0.5 * mu * w[1] ** 2  # noqa: E731
    a = 1.0
    for _ in range(100):  # solve lam tanh(a) = 2a/eta by fixed point
        a = eta * lam * np.tanh(a) / 2
    opt = rf.make_optimizer("gd", learning_rate=eta)
    s = rf.Slow(jnp.asarray(0.0))
    rod, y = rod_flow(opt, loss, rf.Phase(jnp.array([-a, 0.0])), s, rf.Phase(jnp.array([a, 0.0])), s)
    v = rod.vector_field(0.0, y, None)
    assert np.abs(flat(v.centre)).max() < 1e-12 and np.abs(flat(v.half)).max() < 1e-12
    # from GD's own iterates after a transient: the rod stays on the orbit
    run = run_discrete(opt, loss, jnp.array([0.3, 0.2]), 200)
    assert abs(abs(float(run.params[-1][0])) - a) < 1e-8
    z0, s0 = run.state_at(50)
    z1, s1 = run.state_at(51)
    rod, y = rod_flow(opt, loss, z0, s0, z1, s1)
    out = integrate(rod, y, 50, 150)
    np.testing.assert_allclose(out.half_norm[-1], a, rtol=1e-6)
    assert np.abs(flat(out.centre)[-2:]).max() < 1e-6


def test_flow_failure_is_reported_not_raised():
    loss = lambda w: jnp.sum(jnp.exp(3.0 * w))  # noqa: E731  (blows up in finite time for the flow)
    opt = rf.make_optimizer("gd", learning_rate=1.0)
    z0 = rf.Phase(-jnp.ones(2))
    s = opt.init(z0.params)[1]
    flow, y = stable_flow(opt, lambda w: -loss(w), z0, s, s)
    out = integrate(flow, y, 0, 50)
    assert out.failed and out.failed_at is not None


def test_endpoints_in_sequence_or_batched_give_the_same_fields(monkeypatch, optimizer_name):
    """``over_endpoints`` maps a rod's two endpoints in sequence on a CPU and batched elsewhere:
    the fields (rod, second-order rod, inertial rod) must not depend on which, nor on the order."""
    from rodflow_jax.flows import _base

    opt, loss, z0, s0, z1, s1 = _start(optimizer_name)
    kinds = [k for k in ("rod1", "rod2", "inertial") if rf.FLOWS[k].supports(opt) is None]
    fields = {}
    for mode in ("map", "vmap"):
        monkeypatch.setattr(_base, "ENDPOINTS", mode)
        for kind in kinds:
            flow, y = rf.make_flow(kind, opt, loss, z0, s0, z1, s1)
            fields[mode, kind] = flat(flow.vector_field(0.0, y, None))
    for kind in kinds:
        assert np.all(np.isfinite(fields["map", kind]))
        # the default second-order form divides a difference of fields by 2/100: rounding x 50
        atol = 1e-12 if rf.FLOWS[kind].second_order else 1e-15
        np.testing.assert_allclose(fields["map", kind], fields["vmap", kind], rtol=1e-12, atol=atol)
