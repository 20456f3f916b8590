import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import rodflow_jax as rf
from rodflow_jax._integrate import default_solver
from rodflow_jax._tree import tree_add, tree_sub
from rodflow_jax.flows import InertialState, RodState, StableState
from rodflow_jax.flows._second_order import (DERIVATIVES, resolve_derivative, SAMPLE_FRACTION, SecondOrderFlow, second_order,
                                             second_order_solver)
from rodflow_jax.optimizers import Phase
from helpers import flat, lr_for, tiny_mlp

LAM = jnp.array([1.0, 0.025, 0.05])  # one loss for every test below (one compilation)


@eqx.filter_jit
def _field(flow, y):
    return flow.vector_field(0.0, y, None)


def _unit_map(flow, y0, rtol=1e-11, atol=1e-13):
    """The flow's time-1 map at ``y0``, integrated far below the effects measured."""
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(flow.vector_field), diffrax.Tsit5(), 0.0, 1.0, None, y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=100_000,
    )
    return jax.tree.map(lambda x: x[-1], sol.ys)


def _quadratic_loss(p):
    return 0.5 * jnp.sum(LAM * p["w"] ** 2)


def _quadratic_rod(eps):
    """GD's rod on ``L = sum lam_i w_i^2 / 2`` at ``eta = (2 + eps)/lam_0``: ``r`` along the sharp
    direction, the centre along the two slow ones (``eta lam = 0.025 (2 + eps), 0.05 (2 + eps)``)."""
    opt = rf.make_optimizer("gd", learning_rate=(2.0 + eps) / float(LAM[0]))
    w = {"w": jnp.zeros(3)}
    _, s = opt.init(w)
    rod, y = rf.rod_flow(opt, _quadratic_loss, Phase(w), s, Phase(w), s)
    y = RodState(Phase({"w": jnp.array([0.0, 1.0, 1.0])}), Phase({"w": jnp.array([1.0, 0.0, 0.0])}), y.slow)
    return rod, y


def test_r_mode_growth_is_second_order_on_a_quadratic():
    """The rod map grows the r-mode by ``|1 - eta lam| = 1 + eps``; the first-order flow by
    ``exp(eps)`` (error ``eps^2/2``), the corrected one by ``exp(eps - eps^2/2)`` (``-eps^3/3``)."""
    epsilons = (0.2, 0.1, 0.05)
    errs = []
    for eps in epsilons:
        rod, y = _quadratic_rod(eps)
        errs.append([float(_unit_map(f, y).half.params["w"][0]) - (1.0 + eps) for f in (rod, second_order(rod))])
    errs = np.array(errs)  # rows: eps; columns: first, second order
    for eps, (e1, e2) in zip(epsilons, errs):
        assert e1 == pytest.approx(np.exp(eps) - 1 - eps, abs=1e-9)
        assert e2 == pytest.approx(np.exp(eps - eps**2 / 2) - 1 - eps, abs=1e-9)
        assert abs(e2) < abs(e1) / 5
    # halving eps divides the first-order error by ~4 (O(eps^2)), the second-order one by ~8
    r1 = errs[:-1, 0] / errs[1:, 0]
    r2 = errs[:-1, 1] / errs[1:, 1]
    assert np.all((3.6 < r1) & (r1 < 4.4)), r1
    assert np.all((7.2 < r2) & (r2 < 8.8)), r2
    assert np.all(errs[:, 1] < 0)  # 1 + eps - eps^3/3 + ...: just below the rod map


def test_exact_growth_makes_a_growing_r_mode_exact_and_leaves_the_rest_second_order():
    """``rod2`` (``exact_growth``): the growing r-mode moves by exactly ``1 + eps`` per unit time,
    also far past the edge where ``q`` turns over (``eps = 1.5``: plain ``exp(0.375) = 1.45``
    against the map's 2.5); a decaying r-mode (``eps < 0``) and the centre modes keep the plain
    second-order rates."""
    for eps in (0.2, 0.6, 1.5):
        rod, y = _quadratic_rod(eps)
        exact = _unit_map(second_order(rod, exact_growth=True), y)
        assert float(exact.half.params["w"][0]) == pytest.approx(1.0 + eps, rel=1e-9)
        plain = _unit_map(second_order(rod), y)
        np.testing.assert_allclose(np.asarray(exact.centre.params["w"]), np.asarray(plain.centre.params["w"]),
                                   rtol=1e-9, atol=1e-12)
    assert float(plain.half.params["w"][0]) == pytest.approx(np.exp(1.5 - 1.5**2 / 2), rel=1e-9)
    for eps in (-0.2, -0.6):  # eta lam = 1.8, 1.4: the flipped r-multiplier 0.8, 0.4
        rod, y = _quadratic_rod(eps)
        r = float(_unit_map(second_order(rod, exact_growth=True), y).half.params["w"][0])
        assert r == pytest.approx(np.exp(eps - eps**2 / 2), rel=1e-9)


def test_centre_modes_move_at_the_second_order_rate():
    """Along a slow direction the rod map multiplies the centre by ``1 - x`` (``x = eta lam``),
    the flows by ``exp(-x)`` and ``exp(-x - x^2/2)``."""
    rod, y = _quadratic_rod(0.1)
    x = 2.1 * np.asarray(LAM[1:])
    first = np.asarray(_unit_map(rod, y).centre.params["w"][1:])
    second = np.asarray(_unit_map(second_order(rod), y).centre.params["w"][1:])
    np.testing.assert_allclose(first, np.exp(-x), rtol=1e-9)
    np.testing.assert_allclose(second, np.exp(-x - x**2 / 2), rtol=1e-9)
    assert np.all(np.abs(second - (1 - x)) < np.abs(first - (1 - x)) / 10)


@pytest.mark.parametrize("derivative", ["difference", "fd"])
def test_difference_forms_are_the_jvp_form_on_a_quadratic_and_differ_at_third_order(derivative):
    """The finite-difference forms, ``v - (v(y + a v) - v) / (2 a)`` (``"difference"``: ``a = 1/2``,
    ``2 v - v(y + v/2)``; ``"fd"``: ``a = 1/100``), are the default ``v - Dv[v]/2`` exactly on a
    linear field (to rounding, ``~u/a``); on a nonlinear one they differ from the ``jvp`` form by
    ``-(a/4) D^2v[v, v]`` up to ``O(a^2 v^4)``: GD's rod on the tiny MLP at ``eta`` and ``eta/2``."""
    a = SAMPLE_FRACTION[derivative]
    rod, y = _quadratic_rod(0.2)
    exact = flat(_field(second_order(rod, derivative="jvp"), y))
    np.testing.assert_allclose(flat(_field(second_order(rod, derivative=derivative), y)), exact, rtol=1e-12 / a,
                               atol=1e-15 / a)
    loss, params = tiny_mlp()
    rel = []
    for lr in (0.2, 0.1):
        opt = rf.make_optimizer("gd", learning_rate=lr)
        run = rf.run_discrete(opt, loss, params, 2)
        rod, y = rf.rod_flow(opt, loss, *run.state_at(0), *run.state_at(1))
        f = lambda z: rod.vector_field(0.0, z, None)  # noqa: E731
        v = f(y)
        d2 = jax.jvp(lambda z: jax.jvp(f, (z,), (v,))[1], (y,), (v,))[1]
        gap = flat(_field(second_order(rod, derivative=derivative), y)) - flat(_field(second_order(rod, derivative="jvp"), y))
        predicted = -a * flat(d2) / 4
        rel.append(np.linalg.norm(gap - predicted) / np.linalg.norm(predicted))
    # O(a eta) relative: halves with eta, and is a/(1/2) times smaller for the near-tangent sample
    assert rel[0] < 0.4 * a and rel[1] < 0.6 * rel[0], rel
    with pytest.raises(ValueError, match="derivative"):
        second_order(rod, derivative="linearize")


def test_the_derivative_option_reaches_the_second_order_rod():
    """``flow_options={"rod2": {"derivative": ...}}`` (as ``compare`` passes it) picks the form;
    the default is ``auto`` (since stop 34): ``fd`` in float64, ``jvp`` in float32."""
    opt, loss, z0, s0, z1, s1 = _start("gd", steps=2)
    assert rf.make_flow("rod2", opt, loss, z0, s0, z1, s1)[0].derivative == "auto" == DERIVATIVES[0]
    assert resolve_derivative("auto", jnp.float64) == "fd" and resolve_derivative("auto", jnp.float32) == "jvp"
    assert resolve_derivative("jvp", jnp.float64) == "jvp"
    for d in DERIVATIVES:
        assert rf.make_flow("rod2", opt, loss, z0, s0, z1, s1, derivative=d)[0].derivative == d


def test_difference_form_stays_in_the_domain_where_a_backward_point_leaves_it():
    """An RMSProp rod whose second moment is far below ``g^2`` (a first step, or a gradient that
    jumps): the difference form's sample ``y + v/2`` (between ``y`` and ``R(y)``) keeps the field
    finite, where a backward sample ``y - v/3`` takes the second moment below zero."""
    opt, loss, z0, s0, z1, s1 = _start("rmsprop", steps=2)
    rod, y = rf.rod_flow(opt, loss, z0, s0, z1, s1)
    y = RodState(y.centre, y.half, y.slow._replace(nu=jax.tree.map(lambda n: 1e-9 * n, y.slow.nu)))
    assert np.all(np.isfinite(flat(_field(second_order(rod, derivative="difference"), y))))
    v = _field(rod, y)
    back = jax.tree.map(lambda a, b: a - b / 3, y, v)
    assert not np.all(np.isfinite(flat(_field(rod, back))))


def _start(name, steps=12, **hp):
    loss, params = tiny_mlp()
    opt = rf.make_optimizer(name, learning_rate=lr_for(name), **hp)
    run = rf.run_discrete(opt, loss, params, steps)
    z0, s0 = run.state_at(steps - 2)
    z1, s1 = run.state_at(steps - 1)
    return opt, loss, z0, s0, z1, s1


@pytest.mark.parametrize("optimizer_name", ["gd", "nesterov", "scalar_rmsprop", "adam"])  # one per family
def test_rod_orientation_symmetry_and_zero_half_vector(optimizer_name):
    """``r -> -r`` maps the corrected field to itself flipped, and at ``r = 0`` the corrected rod
    is the corrected stable flow (``r = 0`` stays invariant)."""
    opt, loss, z0, s0, z1, s1 = _start(optimizer_name)
    rod, y = rf.rod_flow(opt, loss, z0, s0, z1, s1)
    for f in (second_order(rod), second_order(rod, exact_growth=True)):
        _check_symmetry_and_zero_half_vector(f, rod, opt, loss, z0, s0, s1, y)


def _check_symmetry_and_zero_half_vector(f, rod, opt, loss, z0, s0, s1, y):
    a = _field(f, y)
    b = _field(f, RodState(y.centre, jax.tree.map(jnp.negative, y.half), y.slow))
    np.testing.assert_allclose(flat(a.centre), flat(b.centre), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(flat(a.half), -flat(b.half), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(flat(a.slow), flat(b.slow), rtol=1e-10, atol=1e-14)
    assert np.abs(flat(tree_sub(a, _field(rod, y)))).max() > 0  # the correction is not zero

    stable = type(rf.stable_flow(opt, loss, z0, s0, s1)[0])(opt, loss, rod.scale)
    y0 = RodState(y.centre, jax.tree.map(jnp.zeros_like, y.half), y.slow)
    d_rod = _field(f, y0)
    d_stable = _field(second_order(stable), StableState(y.centre, y.slow))
    np.testing.assert_allclose(flat(d_rod.centre), flat(d_stable.phase), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(flat(d_rod.slow), flat(d_stable.slow), rtol=1e-10, atol=1e-14)
    assert np.all(flat(d_rod.half) == 0.0)


@pytest.mark.slow
def test_zero_half_vector_integrates_to_the_corrected_stable_flow():
    opt, loss, z0, s0, z1, s1 = _start("gd")
    rod, y = rf.rod_flow(opt, loss, z0, s0, z1, s1)
    stable = type(rf.stable_flow(opt, loss, z0, s0, s1)[0])(opt, loss, rod.scale)
    y0 = RodState(y.centre, jax.tree.map(jnp.zeros_like, y.half), y.slow)
    a = rf.integrate(second_order(rod), y0, 10, 20)
    b = rf.integrate(second_order(stable), StableState(y.centre, y.slow), 10, 20)
    assert not a.failed and not b.failed
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-7)
    np.testing.assert_allclose(flat(a.centre), flat(b.centre), rtol=1e-6, atol=1e-8)
    assert np.all(a.half_norm == 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("name, hp", [("adam", {}), ("heavy_ball", {"momentum": 0.9})])
def test_unit_time_map_is_closer_to_the_rod_map(name, hp):
    """The rod's field is ``R - id``, so the discrete rod map is ``y + v(y)`` exactly (for true
    iterates it is the next rod). The corrected flow's unit-time map is closer to it: in the centre
    (phase state) by 13x for Adam, 2.6x for heavy ball at momentum 0.9 (its underdamped bulk
    modes have ``|mu - 1| ~ 1``, where the series converges slowly); in the full state only by
    10-15 %, because the rod's r-modes along flat directions (multiplier -1 after the flip: no
    real logarithm) are damped by both flows."""
    opt, loss, z0, s0, z1, s1 = _start(name, steps=22, **hp)
    rod, y = rf.rod_flow(opt, loss, z0, s0, z1, s1)
    target = tree_add(y, _field(rod, y))
    step = flat(tree_sub(target, y))
    step_c = flat(tree_sub(target.centre, y.centre))
    err, err_c = [], []
    for f in (rod, second_order(rod)):
        y1 = _unit_map(f, y, 1e-10, 1e-12)
        err.append(np.linalg.norm(flat(tree_sub(y1, target))) / np.linalg.norm(step))
        err_c.append(np.linalg.norm(flat(tree_sub(y1.centre, target.centre))) / np.linalg.norm(step_c))
    assert err[1] < 0.95 * err[0], err
    assert err_c[1] < 0.5 * err_c[0], err_c


@pytest.mark.slow
@pytest.mark.parametrize("name", ["heavy_ball", "nesterov"])
def test_inertial_flows_wrap_but_do_not_become_second_order(name):
    """The wrapper works for the inertial flows (symmetry, ``rho = 0`` limit), but does not make
    them second order: their field is not ``R - id``. Measured at momentum 0.9: the corrected
    unit-time map is farther from the discrete rod map (centre 0.08 -> 0.18 of a step for heavy
    ball) and even from the field's own Euler step ``y + v(y)`` (0.31 -> 0.67)."""
    opt, loss, z0, s0, z1, s1 = _start(name, steps=22, momentum=0.9)
    inner, y = rf.inertial_flow(opt, loss, z0, s0, z1, s1)
    f = second_order(inner)
    assert f.models_oscillation and f.optimizer is inner.optimizer

    a = _field(f, y)
    b = _field(f, InertialState(y.centre, jax.tree.map(jnp.negative, y.half), y.centre_velocity,
                                jax.tree.map(jnp.negative, y.half_velocity), y.slow))
    even = lambda d: flat((d.centre, d.centre_velocity, d.slow))  # noqa: E731
    odd = lambda d: flat((d.half, d.half_velocity))  # noqa: E731
    np.testing.assert_allclose(even(a), even(b), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(odd(a), -odd(b), rtol=1e-10, atol=1e-14)

    stable_inner, ys = rf.inertial_flow(opt, loss, z0, s0, z1, s1, rod=False)
    d_rod, d_stable = _field(f, ys), _field(second_order(stable_inner), ys)
    np.testing.assert_allclose(flat(d_rod), flat(d_stable), rtol=1e-10, atol=1e-14)
    assert np.all(odd(d_rod) == 0.0)

    uc, ur, new_slow = inner.velocity_map(y)
    discrete = InertialState(tree_add(y.centre, uc), tree_add(y.half, ur), uc, ur, inner.scaled(new_slow))
    first, second = _unit_map(inner, y, 1e-9, 1e-11), _unit_map(f, y, 1e-9, 1e-11)

    def dist(p, q):
        return np.linalg.norm(flat(tree_sub(p, q)))

    closer = dist(second.centre, discrete.centre) < dist(first.centre, discrete.centre)
    assert not closer, "the corrected inertial flow is now closer: update flows/_second_order.py's docs"


@pytest.mark.parametrize("name", ["heavy_ball", "nesterov"])
def test_the_correction_anti_damps_the_inertial_rotation(name):
    """At a fixed point the corrected field's Jacobian is ``J - J^2/2``, so an eigenvalue ``a`` of
    the inner field becomes ``a - a^2/2``: a rotation ``a = i w`` gains the growth rate
    ``w^2/2``. The inertial rod's ``rho``-block rotates at ``w ~ sqrt(kappa (2 + 2 beta)) ~ 2``
    rad per step along flat directions, so the corrected inertial flow is unstable (on the tiny
    MLP it leaves the step budget with an infinite loss 4 steps in). The rod's field has
    eigenvalues ``mu - 1`` with ``Re q(mu - 1) <= Re (mu - 1) < 0`` for its damped modes."""
    opt = rf.make_optimizer(name, learning_rate=0.1, momentum=0.9)
    w = {"w": jnp.zeros(3)}
    z, s = opt.init(w)
    inner, y = rf.inertial_flow(opt, _quadratic_loss, z, s, z, s)  # at the minimum: a fixed point
    flat_y, unravel = jax.flatten_util.ravel_pytree(y)

    def jac(flow):
        return np.asarray(jax.jacfwd(lambda x: jax.flatten_util.ravel_pytree(_field(flow, unravel(x)))[0])(flat_y))

    a = np.linalg.eigvals(jac(inner))
    b = np.linalg.eigvals(jac(second_order(inner)))
    assert a.real.max() < 1e-12  # the inertial flow is stable at the minimum
    np.testing.assert_allclose(np.sort_complex(b), np.sort_complex(a - a**2 / 2), atol=1e-9)
    assert b.real.max() > 1.0  # |Im a| ~ 2: growth e^2 per step


@pytest.mark.slow
def test_integrate_and_solver_budget():
    opt, loss, z0, s0, z1, s1 = _start("gd", steps=30)
    rod, y = rf.rod_flow(opt, loss, z0, s0, z1, s1)
    f = second_order(rod)
    assert isinstance(f, SecondOrderFlow) and f.inner is rod and f.scale is rod.scale
    run = rf.integrate(f, y, 0, 20)
    ref = rf.integrate(rod, y, 0, 20)
    assert not run.failed and run.solver_steps > 0
    assert run.half_norm is not None and run.half_norm.shape == ref.half_norm.shape
    assert run.loss[0] == ref.loss[0]  # same start, same readout
    cfg, base = second_order_solver(f, jnp.float64), default_solver(rod, jnp.float64)
    assert cfg.max_steps_per_step == 2 * base.max_steps_per_step and (cfg.rtol, cfg.atol) == (base.rtol, base.atol)
    with pytest.raises(TypeError):
        second_order(f)
