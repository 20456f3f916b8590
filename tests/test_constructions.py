"""The rod constructions by name, the default each optimizer runs, the second-order rods' own
tolerance on ``r``, and stalled-but-converged flows held fixed."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rodflow_jax as rf
from rodflow_jax._integrate import HalfTolerance, default_solver, half_atol, solver_name, step_size_controller
from rodflow_jax.experiments._engine import hold_converged
from rodflow_jax.flows._registry import ROD_CONSTRUCTIONS, default_construction
from rodflow_jax.flows._second_order import second_order_margin
from rodflow_jax.flows import RodState
from helpers import flat, tiny_mlp


def _start(name, **hp):
    loss, p0 = tiny_mlp(0)
    opt = rf.make_optimizer(name, learning_rate=0.05, **hp)
    run = rf.run_discrete(opt, loss, p0, 3)
    return opt, loss, (*run.state_at(0), *run.state_at(1))


def test_every_construction_is_a_flow_and_rod_is_the_optimizers_default():
    assert set(ROD_CONSTRUCTIONS) <= set(rf.FLOWS)
    expect = {("gd", None): "rod2", ("rmsprop", None): "rod2", ("adam", None): "inertial",
              ("scalar_nadam", None): "inertial", ("heavy_ball", 0.9): "inertial", ("heavy_ball", 0.5): "inertial",
              ("nesterov", 0.9): "inertial", ("nesterov", 0.5): "rod2", ("heavy_ball", 0.0): "rod2"}
    for (name, beta), construction in expect.items():
        opt, loss, states = _start(name, **({} if beta is None else {"momentum": beta}))
        assert default_construction(opt) == construction, (name, beta)
        flow, _ = rf.make_flow("rod", opt, loss, *states)
        assert flow.construction == construction
    for kind, cls_name in (("rod1", "RodFlow"), ("rod2", "SecondOrderFlow")):
        opt, loss, states = _start("gd")
        flow, _ = rf.make_flow(kind, opt, loss, *states)
        assert type(flow).__name__ == cls_name and flow.construction == kind


def test_second_order_margin_is_where_the_flipped_r_multiplier_reaches_two():
    """Heavy ball on a quadratic: mu = 2 at eta lambda = (6 + 3 beta)/2, i.e. (6 + 3 beta)/(4 + 4 beta)
    of the threshold; GD's is 1.5. A batch gets its smallest margin (its largest momentum)."""
    for beta in (0.0, 0.3, 0.5, 0.9):
        opt = rf.make_optimizer("heavy_ball", learning_rate=0.1, momentum=beta)
        assert second_order_margin(opt) == pytest.approx((6 + 3 * beta) / (4 + 4 * beta), rel=1e-9)
    assert second_order_margin(rf.make_optimizer("gd", learning_rate=0.1)) == pytest.approx(1.5, rel=1e-9)
    batch = rf.make_optimizer("nesterov", learning_rate=0.1, momentum=jnp.array([0.5, 0.9]))
    assert second_order_margin(batch) == pytest.approx(
        second_order_margin(rf.make_optimizer("nesterov", learning_rate=0.1, momentum=0.9)))
    assert default_construction(batch) == "inertial"  # one construction per batch: the one that holds for all


def test_second_order_rods_hold_r_to_their_own_tolerance():
    opt, loss, states = _start("gd")
    rod2, _ = rf.make_flow("rod2", opt, loss, *states)
    rod1, _ = rf.make_flow("rod1", opt, loss, *states)
    c64, c32 = default_solver(rod2, jnp.float64), default_solver(rod2, jnp.float32)
    # float64: relative to |r| down to far below the rounding seed (~1e-16 |c|), eps^2
    assert c64.half_atol == pytest.approx(np.finfo(np.float64).eps ** 2)
    assert c32.half_atol == c32.atol  # float32: its seed sits at atol, and rtol 1e-5 at rounding
    assert default_solver(rod1, jnp.float64).half_atol is None
    assert "r tol >= 5e-32" in solver_name(c64)
    stable2 = rf.second_order(rf.make_flow("stable", opt, loss, *states)[0])
    assert default_solver(stable2, jnp.float64).half_atol is None  # nothing to scale
    assert half_atol(jnp.float64, 1e-9) == c64.half_atol and half_atol(jnp.float32, 1e-7) == 1e-7
    # a second-order rod outside its correction's range stalls: its budget is paced (a fallback takes over)
    from rodflow_jax._integrate import PacedBudget, step_size_controller

    for dtype in (jnp.float64, jnp.float32):
        assert isinstance(step_size_controller(rod2, default_solver(rod2, dtype)), PacedBudget)
    assert not isinstance(step_size_controller(rod1, default_solver(rod1, jnp.float64)), PacedBudget)


def test_half_tolerance_is_relative_to_the_rod_between_its_floor_and_atol():
    """The oscillation's per-component tolerance reads ``clip(rtol |o|, half_atol, atol) + rtol
    a_i``: ``half_atol`` for a small rod, ``atol`` (no reweighting) for a large one, ``rtol |o|``
    between; the centre and slow state keep ``atol + rtol |y_i|``."""
    opt, loss, states = _start("gd")
    rod2, y = rf.make_flow("rod2", opt, loss, *states)
    cfg = default_solver(rod2, jnp.float64)
    ctrl = step_size_controller(rod2, cfg).controller  # (inside its PacedBudget)
    assert isinstance(ctrl, HalfTolerance) and (ctrl.rtol, ctrl.atol) == (cfg.rtol, cfg.atol)
    rtol, atol, floor = cfg.rtol, cfg.atol, cfg.half_atol
    err = jax.tree.map(jnp.ones_like, y)
    for size, tol in ((1e-40, floor), (1e-9, rtol * 1e-9), (1e-4, rtol * 1e-4), (1.0, atol)):
        half = jax.tree.map(lambda x: x * size / float(rod2.half_norm(y)), y.half)
        yy = RodState(y.centre, half, y.slow)
        out = ctrl.weighted_error(yy, yy, err)
        a = np.abs(flat(half))
        np.testing.assert_allclose(flat(out.half), (atol + rtol * a) / (tol + rtol * a), rtol=1e-12)
        assert np.all(flat(out.centre) == 1.0) and np.all(flat(out.slow) == 1.0)
    # no wrapper where r keeps atol, or for a flow without a rod
    unpaced = dataclasses.replace(cfg, reserve=None)
    assert not isinstance(step_size_controller(rod2, dataclasses.replace(unpaced, half_atol=cfg.atol)), HalfTolerance)
    stable, _ = rf.make_flow("stable", opt, loss, *states)
    assert not isinstance(step_size_controller(stable, unpaced), HalfTolerance)


def test_second_order_rod_lets_r_decay_to_rounding_level_before_the_edge():
    """GD below its threshold on a quadratic: the rod's r-modes decay (eta lam - 2 < 0). With r
    held to 1e-12 the corrected rod's |r| reaches rounding level (~1e-14); held to the centre's
    1e-9 it stalls near 1e-11 (the seed of an early catapult, README)."""
    lam = jnp.array([1.0, 0.5, 0.2])
    loss = lambda w: 0.5 * jnp.sum(lam * w ** 2)  # noqa: E731
    opt = rf.make_optimizer("gd", learning_rate=1.5)  # eta lam = 1.5, 0.75, 0.3
    run = rf.run_discrete(opt, loss, jnp.array([1.0, 1.0, 1.0]), 2)
    flow, y = rf.make_flow("rod2", opt, loss, *run.state_at(0), *run.state_at(1))
    cfg = default_solver(flow, jnp.float64)
    tight = rf.integrate(flow, y, 0, 60, config=cfg)
    loose = rf.integrate(flow, y, 0, 60, config=dataclasses.replace(cfg, half_atol=None))
    assert not tight.failed and not loose.failed
    tail = slice(-15, None)
    assert tight.half_norm[tail].max() < 1e-12  # measured 4e-13 at most, ~1e-14 typical
    assert loose.half_norm[tail].max() > 30 * tight.half_norm[tail].max()  # measured 4e-11 at most


def test_metrics_record_the_construction_and_cli_runs_each(tmp_path):
    loss, p0 = tiny_mlp(0)
    opt = rf.make_optimizer("gd", learning_rate=0.3)
    cmp = rf.compare(loss, p0, opt, 30, models=("discrete", "rod", "rod1"), probe_every=10)
    assert cmp.metrics["rod"]["construction"] == "rod2" and cmp.metrics["rod1"]["construction"] == "rod1"
    assert "r tol >= 5e-32" in cmp.metrics["rod"]["solver"]
    from rodflow_jax.cli import main
    out = tmp_path / "run"
    assert main(["compare", "--problem", "toy", "--optimizer", "heavy_ball", "--steps", "60", "--models",
                 "discrete,rod,rod1,rod2", "--out", str(out), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [m[k]["construction"] for k in ("rod", "rod1", "rod2")] == ["inertial", "rod1", "rod2"]


def _sol(centres, loss, result):
    """A one-row solve: (loss, half, centre, slow, var, result, steps, rejected)."""
    c = np.asarray(centres, float)[None]
    m = c.shape[1]
    return (np.asarray(loss, float)[None], np.zeros((1, len(loss))), [c], [np.ones_like(c)], np.zeros((1, m)),
            np.array([result]), np.array([10]), np.array([5]))


def test_a_converged_flow_that_stalls_is_held_and_says_so():
    import diffrax
    budget = int(diffrax.RESULTS.max_steps_reached._value)
    ts = np.arange(100, 200)
    pts = np.arange(100, 200, 5)
    loss = np.where(ts <= 170, -1.0, np.inf)
    still = np.where(pts[:, None] <= 170, 2.0 + 1e-9 * np.sin(pts)[:, None], np.inf) * np.ones((1, 2))
    sol, notes = hold_converged(_sol(still, loss, budget), ts, pts, 1e-6)
    assert sol[5][0] == 0 and "held fixed from step 170" in notes[0]
    assert np.all(sol[0][0] == -1.0) and np.isfinite(sol[2][0]).all()
    # a centre creeping at its minimum by what the stiff solve resolves (rtol 1e-6; here 3e-6 of
    # its norm over the window, as deep-linear scalar NAdam's 1.0e-6 at step 432) is held too
    creeping = np.where(pts[:, None] <= 170, 2.0 * (1 + 1e-7 * (pts[:, None] - 100)), np.inf) * np.ones((1, 2))
    stalled = int(diffrax.RESULTS.dt_min_reached._value)
    sol, notes = hold_converged(_sol(creeping, loss, stalled), ts, pts, 1e-6)
    assert sol[5][0] == 0 and "held fixed from step 170" in notes[0]
    moving = np.where(pts[:, None] <= 170, 2.0 + 1e-3 * pts[:, None], np.inf) * np.ones((1, 2))
    sol, notes = hold_converged(_sol(moving, loss, budget), ts, pts, 1e-6)
    assert sol[5][0] == budget and notes[0] == ""  # a real failure stays one
