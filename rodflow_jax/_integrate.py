"""Integrating a flow with diffrax, saving only what the comparison needs."""

from __future__ import annotations

from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .flows import AbstractFlow, StableFlow


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
    stiff = isinstance(flow, StableFlow) and flow.optimizer.threshold_quantity != "sharpness"
    return SolverConfig(diffrax.Tsit5(), rtol, atol, 128 if stiff else 64)


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
def _solve(flow, y0, t0, t1, ts, param_ts, config: SolverConfig, max_steps: int, progress: bool, event=None):
    """One diffrax solve; ``event`` (optional ``diffrax.Event``) may stop it early (sweeps use
    one to stop a blown-up configuration instead of letting it exhaust the step budget)."""

    def save_scalar(t, y, args):
        hn = flow.half_norm(y)
        return flow.predicted_loss(y), hn

    def save_state(t, y, args):
        return flow.centre(y).params, flow.slow(y)

    saveat = diffrax.SaveAt(
        subs=[diffrax.SubSaveAt(ts=ts, fn=save_scalar), diffrax.SubSaveAt(ts=param_ts, fn=save_state)]
    )
    return diffrax.diffeqsolve(
        diffrax.ODETerm(flow.vector_field),
        config.solver,
        t0=t0,
        t1=t1,
        dt0=None,
        y0=y0,
        saveat=saveat,
        stepsize_controller=diffrax.PIDController(rtol=config.rtol, atol=config.atol),
        max_steps=max_steps,
        throw=False,
        event=event,
        progress_meter=diffrax.TqdmProgressMeter() if progress else diffrax.NoProgressMeter(),
    )


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
    sol = _solve(flow, y0, ts[0], ts[-1], ts, pts, config, config.max_steps(end_step - start_step), progress)
    (loss, hn), (centre, slow) = sol.ys
    loss = np.asarray(loss)
    finite = np.isfinite(loss)
    ok = sol.result == diffrax.RESULTS.successful
    failed = bool(not ok or not finite.all())
    failed_at = int(steps[np.argmin(finite)]) if not finite.all() else (int(steps[-1]) if failed else None)
    return FlowRun(
        steps=steps,
        loss=loss,
        half_norm=np.asarray(hn) if flow.models_oscillation else None,
        centre=jax.tree.map(np.asarray, centre),
        param_steps=param_steps,
        slow=jax.tree.map(np.asarray, slow),
        failed=failed,
        failed_at=failed_at,
        message=_result_message(sol.result) if failed else "",
        solver_steps=int(sol.stats["num_steps"]),
        rejected_steps=int(sol.stats["num_rejected_steps"]),
    )


def _result_message(result) -> str:
    for name in ("max_steps_reached", "dt_min_reached", "singular", "breakdown", "nonfinite"):
        member = getattr(diffrax.RESULTS, name, None)
        if member is not None and result == member:
            return name
    return "non-finite state" if result == diffrax.RESULTS.successful else "solver failure"
