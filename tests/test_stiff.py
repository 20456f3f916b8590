"""Stiff flows: the matrix-free implicit solver, when it is chosen, and the retry after a budget hit."""

import dataclasses

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optax
import optimistix as optx
import pytest

import rodflow_jax as rf
from rodflow_jax import _integrate as I

H = jnp.array([1.0, 3.0, 10.0, 30.0, 100.0])


def _quadratic(p):
    return 0.5 * jnp.sum(H * p["w"] ** 2)


def _flow(opt, loss, p0, kind=rf.stable_flow):
    disc = rf.run_discrete(opt, loss, p0, 2, save_steps=[0, 1])
    (z0, s0), (z1, s1) = disc.state_at(0), disc.state_at(1)
    return kind(opt, loss, z0, s0, s1) if kind is rf.stable_flow else kind(opt, loss, z0, s0, z1, s1)


def test_krylov_gmres_is_exact_in_few_products_and_vmaps():
    """Four distinct eigenvalues: GMRES is exact after four products; a scaled solve and a batch
    of right-hand sides (one of them zero) agree with the dense solution."""
    d = jnp.array([1.0, 2.0, 30.0, 400.0])
    op = lx.FunctionLinearOperator(lambda x: {"a": d * x["a"]}, {"a": jax.ShapeDtypeStruct((4,), jnp.float64)})
    b = {"a": jnp.array([1.0, -2.0, 3.0, 0.5])}
    sol = lx.linear_solve(op, b, I.KrylovGMRES(1e-12, 0.0, 40), throw=False)
    assert sol.result == lx.RESULTS.successful and int(sol.stats["num_steps"]) == 4
    np.testing.assert_allclose(sol.value["a"], b["a"] / d, rtol=1e-12)
    scaled = lx.linear_solve(op, b, I.KrylovGMRES(1e-12, 0.0, 40), options={"scale": {"a": jnp.array([1e-3, 1, 1e3, 1])}},
                             throw=False)
    np.testing.assert_allclose(scaled.value["a"], b["a"] / d, rtol=1e-10)
    M = jnp.eye(30) + 0.3 * jax.random.normal(jax.random.PRNGKey(0), (30, 30)) / jnp.sqrt(30)
    B = jnp.stack([jnp.arange(30.0), jnp.zeros(30), -jnp.ones(30)])
    X = jax.vmap(lambda v: lx.linear_solve(lx.MatrixLinearOperator(M), v, I.KrylovGMRES(1e-10, 0.0, 30)).value)(B)
    np.testing.assert_allclose(X @ M.T, B, atol=1e-8)
    # too few products for the tolerance: a failure, not a silent inexact answer
    bad = lx.linear_solve(lx.MatrixLinearOperator(M), B[0], I.KrylovGMRES(1e-10, 0.0, 3), throw=False)
    assert bad.result == lx.RESULTS.max_steps_reached


def test_implicit_solver_on_a_stiff_rmsprop_stable_flow():
    """RMSProp's stable flow on a quadratic: the second moment decays with the gradient, so the
    preconditioned sharpness grows ~1,000x past the threshold by t = 300. Tsit5 is held to its
    stability limit (~8,000 steps, at any tolerance: the tight reference takes as many); the
    implicit solver takes ~200 at its default tolerances (rtol 1e-6) and stays within 2e-6 of
    the reference (relative to the path)."""
    opt = rf.make_optimizer("rmsprop", learning_rate=0.01, decay=0.9)
    flow, y0 = _flow(opt, _quadratic, {"w": jnp.ones(5)})
    ts = jnp.arange(0.0, 301.0)
    ref = I._solve_jit(flow, y0, ts, ts, I.SolverConfig(diffrax.Tsit5(), 1e-11, 1e-13, 100), False)
    cfg = I.default_solver(flow, jnp.float64)
    assert I.is_implicit(cfg) and I.solver_name(cfg) == "Kvaerno5+GMRES"
    sol = I._solve_jit(flow, y0, ts, ts, cfg, False)
    assert int(ref.result) == 0 and int(sol.result) == 0
    nu = np.asarray(ref.slow.nu["w"][-1])
    assert 0.01 * np.max(np.asarray(H) / (np.sqrt(nu) + 1e-8)) > 500  # eta lambda_max(P^-1 H): 250x the threshold 2
    assert int(ref.num_steps) > 5000 and int(sol.num_steps) < int(ref.num_steps) / 40
    c, r = np.asarray(sol.centre["w"]), np.asarray(ref.centre["w"])
    err = np.linalg.norm(c - r, axis=1)[30:] / np.linalg.norm(r[30:] - r[0], axis=1)
    assert err.max() < 2e-6  # measured 9.7e-7 (at rtol 1e-7: 2.0e-7)


def test_default_solver_is_implicit_for_the_stiff_flows_only():
    p0 = {"w": jnp.ones(5)}
    for name in ("rmsprop", "scalar_rmsprop", "adam", "scalar_adam", "nadam", "scalar_nadam"):
        opt = rf.make_optimizer(name, learning_rate=0.01)
        stable, _ = _flow(opt, _quadratic, p0)
        rod, _ = _flow(opt, _quadratic, p0, rf.rod_flow)
        assert I.is_implicit(I.default_solver(stable, jnp.float64)), name
        assert I.is_implicit(I.default_solver(stable, jnp.float32)), name
        assert not I.is_implicit(I.default_solver(rod, jnp.float64)), name
        # the stiff stable flows are solved 10x looser in float64; the rods keep the tight default
        assert (I.default_solver(stable, jnp.float64).rtol, I.default_solver(rod, jnp.float64).rtol) == (1e-6, 1e-7)
        assert I.default_solver(stable, jnp.float32).rtol == I.default_solver(rod, jnp.float32).rtol == 1e-5
    wrapped = rf.from_optax(optax.adam, hyperparameters={"learning_rate": 0.01}).prepared(p0)
    assert I.is_implicit(I.default_solver(_flow(wrapped, _quadratic, p0)[0], jnp.float64))
    for name in ("gd", "heavy_ball"):
        stable, _ = _flow(rf.make_optimizer(name, learning_rate=0.01), _quadratic, p0)
        assert I.solver_name(I.default_solver(stable, jnp.float64)) == "Tsit5", name


def _logcosh(p):
    """Curvature 500 at 0 but a bounded gradient: GD at learning rate 1 bounces between two points
    (finite), while its stable flow settles at 0 with stiffness 500 per step."""
    return 5.0 * jnp.sum(jnp.log(jnp.cosh(10.0 * p["w"])))


def _make(seed):
    return _logcosh, {"w": jnp.array([1.0, 0.5])}


def test_a_budget_hit_explicit_solve_is_retried_implicitly():
    """GD's stable flow defaults to Tsit5; here Tsit5 needs ~140 steps per simulated step, past its
    budget of 64. The batched solve re-solves only that configuration with the implicit solver,
    and the record says which solver produced it; a Tsit5 the caller asked for is not retried
    and fails with the reason."""
    res = rf.sweep(_make, "gd", {"learning_rate": [0.01, 1.0]}, num_steps=20, models=("discrete", "stable"),
                   start_step=0)
    slow_lr, stiff_lr = (r["stable"] for r in res.records)
    assert not res.records[1]["discrete"]["diverged"]
    assert slow_lr["solver"] == "Tsit5" and not slow_lr["failed"]
    assert stiff_lr["solver"] == "Kvaerno5+GMRES (retried: Tsit5 ran out of its step budget)"
    assert not stiff_lr["failed"] and stiff_lr["solver_steps"] < 200
    # the retry keeps the explicit solve's tolerances (a rod's half tolerance too)
    retry = I.implicit_retry(rf.SolverConfig(diffrax.Tsit5(), 1e-7, 1e-9, 64, half_atol=1e-12), jnp.float64)
    assert I.is_implicit(retry) and (retry.rtol, retry.atol, retry.half_atol) == (1e-7, 1e-9, 1e-12)
    assert stiff_lr["final_loss"] == pytest.approx(0.0, abs=1e-6)  # settled at the minimum
    loss_fn, p0 = _make(0)
    explicit = {"stable": rf.SolverConfig(diffrax.Tsit5(), 1e-7, 1e-9, 64)}
    m = rf.compare(loss_fn, p0, rf.make_optimizer("gd", learning_rate=1.0), 20, models=("discrete", "stable"),
                   solver=explicit).metrics["stable"]
    assert m["failed"] and m["message"] == "max_steps_reached" and m["solver"] == "Tsit5"


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_leaving_the_domain_is_reported_as_such(dtype):
    """GD's stable flow on sqrt(w) reaches w = 0 in finite time, where the gradient is singular
    and beyond which it is not finite: every implicit step is rejected until the step size
    collapses, and the run says so (not a budget hit, not stiffness). The explicit default runs
    out of its budget there instead (and the batched solve would retry it implicitly). In
    float32 the same collapse can be rounding, so the message claims no domain and names the
    rerun."""
    loss = lambda p: jnp.sum(jnp.sqrt(p["w"]))  # noqa: E731
    flow, y0 = _flow(rf.make_optimizer("gd", learning_rate=0.01), loss, {"w": jnp.array([1.0], dtype)})
    run = rf.integrate(flow, y0, 0, 200, config=I.stiff_solver(dtype))
    if dtype == jnp.float64:
        assert run.failed and run.message.startswith("left its domain"), run.message
    else:
        assert run.failed and run.message.startswith("stalled") and "float64" in run.message, run.message
        assert "domain" not in run.message.split(":")[0]
    assert 120 <= run.failed_at <= 135  # w = 0 at t = 4/3 / 0.01 ~ 133
    explicit = rf.integrate(flow, y0, 0, 200)
    assert explicit.failed and explicit.message == "max_steps_reached" and 120 <= explicit.failed_at <= 135


def test_stiff_solver_uses_a_pi_controller_and_explicit_solves_keep_i():
    """The stiff configuration's PI coefficients reach the controller the solve builds; the explicit
    default keeps diffrax's I controller (README, "Stiff stable flows")."""
    stiff = I.stiff_solver(jnp.float64).controller()
    assert (stiff.pcoeff, stiff.icoeff) == (0.3, 0.3) and stiff.dtmin == I.min_step(jnp.float64)
    flow, _ = _flow(rf.make_optimizer("gd", learning_rate=0.01), _quadratic, {"w": jnp.ones(5)})
    explicit = I.default_solver(flow, jnp.float64).controller()
    assert (explicit.pcoeff, explicit.icoeff) == (0.0, 1.0)


def _terminate(finder, diffsize, diffsize_prev, dtype):
    state = I._NewtonKrylovState(jnp.asarray(diffsize, dtype), jnp.asarray(diffsize_prev, dtype),
                               optx.RESULTS.successful, jnp.asarray(3))
    done, result = finder.terminate(None, None, None, {}, state, frozenset())
    return bool(done), result == optx.RESULTS.successful


def test_newton_stall_at_the_rounding_floor_counts_as_converged_not_diverged():
    """In float32 an update stuck near rounding level (rate >= 1 there) is converged; above the
    floor, or with the rule off, a rate >= 1 is divergence; in float64 the floor is never reached."""
    finder = I.NewtonKrylov(rtol=1e-5, atol=1e-7)
    floor = 100 * float(jnp.finfo(jnp.float32).eps) / 1e-5  # 1.19 tolerance units
    assert _terminate(finder, 0.5 * floor, 0.45 * floor, jnp.float32) == (True, True)
    assert _terminate(I.NewtonKrylov(rtol=1e-5, atol=1e-7, rounding_floor=0.0), 0.5 * floor, 0.45 * floor,
                      jnp.float32) == (True, False)
    assert _terminate(finder, 2 * floor, 1.8 * floor, jnp.float32) == (True, False)
    assert _terminate(finder, 0.5 * floor, 2 * floor, jnp.float32) == (False, True)  # still contracting
    f64 = I.NewtonKrylov(rtol=1e-7, atol=1e-9)
    assert _terminate(f64, 1e-3, 0.9e-3, jnp.float64) == (True, False)


def test_a_second_order_rod_out_of_its_budget_falls_back_to_its_first_order_rod(monkeypatch):
    """rod2's correction stops being valid far above the threshold (it is a series in eta lambda),
    where it is stiff enough to exhaust its budget (measured: a softplus net started inside its
    initial catapult). The batched solve then runs rod1 on that configuration instead of an
    implicit retry, and the record says so: construction rod1, its results rod1's, the note
    naming rod2's budget. Forced here by a budget of 16 solver steps in all."""
    from rodflow_jax.experiments import _engine
    from rodflow_jax.flows import SecondOrderFlow

    def starved(flow, dtype, **kw):
        cfg = I.default_solver(flow, dtype, **kw)
        return dataclasses.replace(cfg, max_steps_per_step=0) if isinstance(flow, SecondOrderFlow) else cfg

    monkeypatch.setattr(_engine, "default_solver", starved)
    loss_fn, p0 = _logcosh, {"w": jnp.linspace(0.3, 1.0, 7)}  # a shape of its own: no cached solve
    m = rf.compare(loss_fn, p0, rf.make_optimizer("gd", learning_rate=0.05), 30, models=("discrete", "rod2", "rod1"),
                   start_step=0).metrics
    assert m["rod2"]["construction"] == "rod1" and not m["rod2"]["failed"], m["rod2"]
    assert m["rod2"]["message"].startswith("rod2 ran out of its step budget") and "rod1's results" in m["rod2"]["message"]
    assert m["rod2"]["solver"] == m["rod1"]["solver"] == "Tsit5"
    assert m["rod2"]["final_loss"] == m["rod1"]["final_loss"] and m["rod2"]["solver_steps"] == m["rod1"]["solver_steps"]
    assert m["rod1"]["construction"] == "rod1" and m["rod1"]["message"] == ""


def _decay_solve(rate, controller, t1=50.0):
    term = diffrax.ODETerm(lambda t, y, args: -rate * y)
    return diffrax.diffeqsolve(term, diffrax.Tsit5(), 0.0, t1, 0.1, jnp.ones(3), stepsize_controller=controller,
                               max_steps=16 * int(t1) + 16, throw=False, saveat=diffrax.SaveAt(t1=True))


def test_a_paced_budget_stops_a_stall_early_and_leaves_a_solve_that_keeps_pace_alone():
    """Explicit Tsit5 on ``y' = -1e6 y`` is held to its stability limit (``dt`` about 3e-6): it
    spends an 816-step budget (16 per unit time over 50, + 16) short of ``t = 0.003``. Paced with
    a reserve of 2 units it stops at ``16 * 2 + 16 + 1 = 49`` steps. On ``y' = -y`` (a few steps
    a unit) pacing changes nothing: the same steps, the same bits."""
    pid = diffrax.PIDController(rtol=1e-6, atol=1e-10)
    paced = I.PacedBudget(pid, per_step=16, reserve=2)
    stall, stall_paced = _decay_solve(1e6, pid), _decay_solve(1e6, paced)
    for sol in (stall, stall_paced):
        assert sol.result == diffrax.RESULTS.max_steps_reached
    assert int(stall.stats["num_steps"]) == 816 and int(stall_paced.stats["num_steps"]) == 49
    smooth, smooth_paced = _decay_solve(1.0, pid), _decay_solve(1.0, paced)
    assert smooth_paced.result == diffrax.RESULTS.successful
    assert int(smooth.stats["num_steps"]) == int(smooth_paced.stats["num_steps"]) < 816
    np.testing.assert_array_equal(smooth.ys, smooth_paced.ys)


def test_a_stopped_solve_has_the_budget_of_its_window():
    """A solve that its event will stop at ``t = 2`` (a discrete run that diverged there) has
    ``16 * 2 + 16`` steps of budget, not the whole grid's 816: the stall on ``y' = -1e6 y`` ends
    at step 49, unpaced otherwise. A stop at ``inf`` changes nothing, to the bit."""
    pid = diffrax.PIDController(rtol=1e-6, atol=1e-10)
    stall = _decay_solve(1e6, I.PacedBudget(pid, per_step=16, reserve=None, stop=jnp.asarray(2.0)))
    assert stall.result == diffrax.RESULTS.max_steps_reached and int(stall.stats["num_steps"]) == 49
    smooth = _decay_solve(1.0, pid)
    never = _decay_solve(1.0, I.PacedBudget(pid, per_step=16, reserve=None, stop=jnp.asarray(jnp.inf)))
    assert int(never.stats["num_steps"]) == int(smooth.stats["num_steps"])
    np.testing.assert_array_equal(smooth.ys, never.ys)

