"""Integrating a flow with diffrax, saving only what the comparison needs."""

from __future__ import annotations

from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._tree import tree_all_finite, tree_norm
from .flows import AbstractFlow, StableFlow
from .optimizers import AbstractAdaptiveOptimizer


class SolverConfig(eqx.Module):
    """How a flow is integrated: solver, tolerances and step budget.

    Measured defaults (see README, "Choosing the solver"): the rod flow needs Tsit5 with tight
    tolerances (looser ones leave |r| far above rounding before the edge and seed a fake early
    oscillation); the stable flow of the adaptive optimizers is stiff and gets an implicit solver.
    """

    solver: Any = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps_per_step: int = eqx.field(static=True, default=64)

    def max_steps(self, num_simulated_steps: int) -> int:
        """The solver-step budget for integrating ``num_simulated_steps`` optimizer steps."""
        return self.max_steps_per_step * max(int(num_simulated_steps), 1) + 16


def default_solver(flow: AbstractFlow, dtype) -> SolverConfig:
    """Tsit5 with a PID controller at tight tolerances, with a step budget per simulated step.

    The stable flow of an adaptive optimizer is stiff (its preconditioned sharpness grows without
    bound); it gets the same explicit solver and a larger budget, and a solve that exhausts the
    budget is *reported* as failed (``max_steps_reached``), never silently coarsened. Measured on
    the MLP (README, "Choosing the solver"): an implicit Kvaerno5 with a dense Jacobian was slower
    still on a 2,410-parameter model.
    """
    double = jnp.dtype(dtype) == jnp.float64
    rtol, atol = (1e-7, 1e-9) if double else (1e-5, 1e-7)
    opt = flow.optimizer
    stiff = isinstance(flow, StableFlow) and (isinstance(opt, AbstractAdaptiveOptimizer) or not opt.analytic_threshold)
    return SolverConfig(diffrax.Tsit5(), rtol, atol, 128 if stiff else 64)


class Solution(NamedTuple):
    """What :func:`solve` returns: pure arrays, so it vmaps and differentiates."""

    loss: jax.Array  # (n,) predicted time-averaged loss at ``ts``
    half_norm: jax.Array  # (n,) |r| at ``ts`` (0 for a flow without a rod)
    centre: Any  # centre params at ``param_ts`` (leading axis m)
    slow: Any  # slow state at ``param_ts``
    variance: jax.Array  # (m,) the flow's predicted oscillation variance at ``param_ts``
    result: jax.Array  # diffrax's result code
    num_steps: jax.Array
    num_rejected_steps: jax.Array


def solve(flow: AbstractFlow, y0, ts, param_ts, config: SolverConfig, *, stop_at=None, adjoint=None,
          progress: bool = False) -> Solution:
    """The one diffeqsolve every driver uses: from ``ts[0]`` to ``ts[-1]`` (time in optimizer
    steps), saving the predicted loss and |r| at ``ts`` and the centre, slow state and predicted
    variance at ``param_ts``.

    Pure (no host syncs): jit, vmap and (with ``adjoint``, default diffrax's
    ``RecursiveCheckpointAdjoint``) differentiate it. ``stop_at`` (a time, traced) stops the
    solve there by an event (a sweep stops each configuration where its discrete run diverged);
    an event also stops a state that blows up (norm above ``1e6 (1 + |y0|)``) or stops being
    finite, so it does not burn the step budget. Saved times past the stop are non-finite.
    """

    def save_scalar(t, y, args):
        return flow.predicted_loss(y), flow.half_norm(y)

    def save_state(t, y, args):
        return flow.centre(y).params, flow.slow(y), flow.predicted_variance(y)

    saveat = diffrax.SaveAt(
        subs=[diffrax.SubSaveAt(ts=ts, fn=save_scalar), diffrax.SubSaveAt(ts=param_ts, fn=save_state)]
    )
    bound = 1e6 * (1.0 + tree_norm(y0))
    stop = jnp.asarray(jnp.inf if stop_at is None else stop_at, ts.dtype)

    def halt(t, y, args, **kw):
        return (~(tree_all_finite(y) & (tree_norm(y) < bound))) | (t >= stop)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(flow.vector_field),
        config.solver,
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=y0,
        saveat=saveat,
        stepsize_controller=diffrax.PIDController(rtol=config.rtol, atol=config.atol),
        max_steps=config.max_steps(int(ts.shape[0]) - 1),
        throw=False,
        event=diffrax.Event(halt),
        adjoint=adjoint if adjoint is not None else diffrax.RecursiveCheckpointAdjoint(),
        progress_meter=diffrax.TqdmProgressMeter() if progress else diffrax.NoProgressMeter(),
    )
    (loss, hn), (centre, slow, var) = sol.ys
    return Solution(loss, hn, centre, slow, var, sol.result._value, sol.stats["num_steps"],
                    sol.stats["num_rejected_steps"])


def result_message(code: int) -> str:
    """diffrax's result code as a word (``""`` for success)."""
    for name in ("successful", "max_steps_reached", "event_occurred", "dt_min_reached", "singular", "breakdown",
                 "nonfinite"):
        member = getattr(diffrax.RESULTS, name, None)
        if member is not None and int(member._value) == int(code):
            if name == "event_occurred":
                return "blew up (state norm above 1e6 (1 + |y0|), or not finite)"
            return "" if name == "successful" else name
    return "solver failure"


class FlowRun(NamedTuple):
    """What one integrated flow returns (arrays over the saved steps)."""

    steps: np.ndarray  # (n,) integer steps k at which the flow was saved
    loss: np.ndarray  # (n,) predicted time-averaged loss
    half_norm: np.ndarray | None  # (n,) |r| in parameter space (rod only)
    centre: Any  # pytree of arrays with leading axis (m,): centre params at ``param_steps``
    param_steps: np.ndarray  # (m,)
    slow: Any  # slow state at ``param_steps`` (for preconditioned probes)
    failed: bool
    failed_at: int | None  # first saved step that is not finite, if the solve failed
    message: str
    solver_steps: int
    rejected_steps: int


@eqx.filter_jit
def _solve_jit(flow, y0, ts, param_ts, config, progress):
    return solve(flow, y0, ts, param_ts, config, progress=progress)


def integrate(
    flow: AbstractFlow,
    y0,
    start_step: int,
    end_step: int,
    *,
    param_steps=None,
    config: SolverConfig | None = None,
    progress: bool = False,
) -> FlowRun:
    """Integrate ``flow`` from step ``start_step`` to ``end_step`` (time is in optimizer steps).

    Saves the predicted loss (and the rod's |r|) at every integer step, and the centre's
    parameters and slow state at ``param_steps`` (default: every step). A failed solve (step
    budget exhausted, non-finite state) is reported in ``failed``/``failed_at``, never raised.
    """
    dtype = jax.tree.leaves(y0)[0].dtype
    if config is None:
        config = default_solver(flow, dtype)
    steps = np.arange(start_step, end_step + 1)
    param_steps = steps if param_steps is None else np.asarray(param_steps)
    ts = jnp.asarray(steps, dtype)
    pts = jnp.asarray(param_steps, dtype)
    sol = _solve_jit(flow, y0, ts, pts, config, progress)
    loss = np.asarray(sol.loss)
    finite = np.isfinite(loss)
    ok = result_message(int(sol.result)) == ""
    failed = bool(not ok or not finite.all())
    failed_at = int(steps[np.argmin(finite)]) if not finite.all() else (int(steps[-1]) if failed else None)
    return FlowRun(
        steps=steps,
        loss=loss,
        half_norm=np.asarray(sol.half_norm) if flow.models_oscillation else None,
        centre=jax.tree.map(np.asarray, sol.centre),
        param_steps=param_steps,
        slow=jax.tree.map(np.asarray, sol.slow),
        failed=failed,
        failed_at=failed_at,
        message=(result_message(int(sol.result)) or "non-finite state") if failed else "",
        solver_steps=int(sol.num_steps),
        rejected_steps=int(sol.num_rejected_steps),
    )
