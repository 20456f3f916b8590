"""``compare``: the discrete optimizer and the requested flows from one state, side by side.

A batch of one through :func:`~._evaluate.evaluate`: the same kernels and the same records as a
sweep, plus the per-step trajectories and the figures.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Sequence

import equinox as eqx
import jax
import numpy as np

from .._errors import InputError
from .._integrate import SolverConfig
from ..optimizers import AbstractOptimizer, describe
from ._evaluate import Evaluation, batch_of_one, evaluate
from ._records import run_record
from ._spec import (DEFAULT_MODELS, check_problem, check_single_optimizer, differentiable, resolve_models,
                    resolve_start, resolve_steps)


@dataclasses.dataclass
class Comparison:
    """What :func:`compare` returns: JSON-ready metrics, per-step numpy trajectories, and the
    wall times (kept apart from the metrics so that two identical runs write identical files)."""

    metrics: dict[str, Any]
    trajectories: dict[str, np.ndarray]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    # the discrete run and its probes, and what they were run on: ``compare(..., reuse=...)``
    discrete: Any = dataclasses.field(default=None, repr=False, compare=False)
    source: Any = dataclasses.field(default=None, repr=False, compare=False)

    def save(self, out_dir, *, overwrite: bool = False, title: str | None = None) -> Path:
        """Write ``metrics.json``, ``timings.json``, ``trajectories.npz`` and PNG figures to ``out_dir``,
        completely or not at all (see :func:`rodflow_jax.experiments.output_dir` for the rules)."""
        from .._plot import plot_comparison
        from ._output import output_dir, write_json, write_npz

        with output_dir(out_dir, overwrite=overwrite, flag="out_dir") as tmp:
            write_json(tmp / "metrics.json", self.metrics)
            write_json(tmp / "timings.json", self.timings)
            write_npz(tmp / "trajectories.npz", self.trajectories)
            plot_comparison(self.trajectories, self.metrics, tmp, title=title)
        return Path(out_dir)


def _full(steps, values, length: int, fill=np.nan) -> np.ndarray:
    out = np.full((length,) + np.shape(values)[1:], fill, dtype=float)
    out[steps] = values
    return out


def trajectories(ev: Evaluation, i: int = 0) -> dict[str, np.ndarray]:
    """The per-step arrays of configuration ``i`` (``trajectories.npz``)."""
    N = ev.num_steps
    traj: dict[str, np.ndarray] = {
        "step": np.arange(N + 1),
        "discrete_loss": ev.loss[i],
        "discrete_avg_loss": np.append(ev.avg_loss[i], np.nan),
        "discrete_sharpness_step": ev.probe_steps,
        "discrete_sharpness": ev.probes.eigenvalues[i],
        "discrete_threshold": ev.probes.threshold[i],
        "discrete_half_norm": np.append(ev.half[i], np.nan),
        "discrete_amplitude": np.append(ev.amplitude[i], np.nan),
    }
    for name, f in ev.flows.items():
        traj[f"{name}_loss"] = _full(ev.flow_steps, f.arrays.loss[i], N + 1)
        traj[f"{name}_param_error"] = _full(ev.flow_grid, f.param_error[i], N + 1)
        traj[f"{name}_sharpness_step"] = f.probe_steps
        traj[f"{name}_sharpness"] = f.probes.eigenvalues[i]
        traj[f"{name}_threshold"] = f.probes.threshold[i]
        if ev.predicts_variance(name):
            traj[f"{name}_half_norm"] = _full(ev.flow_steps, f.arrays.half_norm[i], N + 1)
            traj[f"{name}_variance"] = _full(ev.flow_grid, f.arrays.variance[i], N + 1)
    return traj


def _same_leaf(x, y) -> bool:
    if x is y:
        return True
    if eqx.is_array_like(x) and eqx.is_array_like(y) and not (callable(x) or callable(y)):
        x, y = np.asarray(x), np.asarray(y)
        return x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    if inspect.ismethod(x) and inspect.ismethod(y):  # obj.loss is a new object at every access
        return x.__self__ is y.__self__ and x.__func__ is y.__func__
    if eqx.is_array_like(x) or eqx.is_array_like(y):
        return False
    try:
        return bool(x == y)
    except Exception:  # a leaf whose == is not a truth value
        return False


def _same_tree(a, b) -> bool:
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(_same_leaf(x, y) for x, y in zip(la, lb))


def _source(loss_fn, params0, optimizer, *settings) -> tuple:
    """What a comparison's discrete run depends on, for ``reuse``: numpy leaves copied, so that a
    later in-place change of the caller's arrays is seen as a change."""
    copy = lambda x: np.array(x, copy=True) if isinstance(x, np.ndarray) else x  # noqa: E731
    return (loss_fn, *jax.tree.map(copy, (params0, optimizer)), *settings)


def _reused(reuse: "Comparison | None", source) -> Any:
    """``reuse``'s discrete run when it was made on the same ``source`` (loss function, initial
    parameters, optimizer and run settings); refused otherwise."""
    if reuse is None:
        return None
    if reuse.discrete is None or reuse.source is None:
        raise InputError("reuse: that comparison kept no discrete run (pass keep_discrete=True to the compare "
                         "whose run you want to reuse)")
    old, new = reuse.source, source
    if old[3:] != new[3:] or not _same_tree(old[:3], new[:3]):
        raise InputError("reuse: that comparison ran another loss function, initial parameters (values or dtype), "
                         "optimizer, number of steps or probe settings; its discrete run cannot be reused here")
    return reuse.discrete


def compare(
    loss_fn,
    params0,
    optimizer: AbstractOptimizer,
    num_steps: int,
    *,
    start_step: int | str = "auto",
    models: Sequence[str] = DEFAULT_MODELS,
    probe_every: int | None = None,
    top_k: int = 1,
    sharpness_method: str = "auto",
    solver: dict[str, SolverConfig] | None = None,
    flow_options: dict[str, dict] | None = None,
    progress=False,
    param_budget: float = 2e7,
    reuse: Comparison | None = None,
    keep_discrete: bool = False,
) -> Comparison:
    """Run the discrete optimizer and the requested flows from one state and compare them.

    The flows start from the discrete state at ``start_step`` K (``"auto"``:
    :func:`default_start_step`, or, for a run that starts far past its edge, where its initial
    transient ends, :func:`~._evaluate.transient_starts`; ``metrics["start_step"]`` says which): the rod at ``c = (z_K + z_{K+1})/2``, ``r = (z_{K+1} - z_K)/2``,
    the stable flow at ``z_K``. At each step k >= K the flows' centres are compared with the
    discrete midpoint ``mid_k = (z_k + z_{k+1})/2`` (see :mod:`~rodflow_jax.experiments._records`
    for every metric). ``params0`` may be any pytree, an equinox module included: only its
    floating-point array leaves are trained. ``flow_options`` are passed to the flows'
    constructors by name (e.g. ``{"central": {"k": 3}}``).

    ``reuse``: an earlier comparison of the same run (the same ``loss_fn`` object, equal
    ``params0`` and optimizer, the same ``num_steps`` and probe settings), made with
    ``keep_discrete=True``, from another start step: its discrete run and probes are reused
    instead of recomputed where it kept the states this start needs (every step, unless the model
    is too large for that: then the run is made afresh). Anything else is refused.
    ``keep_discrete``: keep this comparison's discrete run on the result for a later ``reuse``:
    its saved states (the parameters and the optimizer's state at every step, or at every
    ``every``-th step and the next for a model too large for that: a few times ``param_budget``
    floats at most) and the loss function it ran. Off by default, so that holding many
    comparisons does not hold their runs.
    """
    check_single_optimizer(optimizer, "compare")
    source = _source(loss_fn, params0, optimizer, num_steps, probe_every, top_k, sharpness_method, param_budget)
    num_steps = resolve_steps(num_steps, num_steps)
    models = resolve_models(models, optimizer)
    K = resolve_start(start_step, [optimizer], num_steps)
    loss_fn, params0 = differentiable(loss_fn, params0)
    check_problem(loss_fn, params0)
    optimizer = optimizer.prepared(params0)
    opt, params = batch_of_one(optimizer, params0)
    discrete = _reused(reuse, source)
    ev = evaluate(loss_fn, opt, params, num_steps, K, models, threshold_quantity=optimizer.threshold_quantity,
                  flow_options=flow_options, solver=solver, probe_every=probe_every, top_k=top_k,
                  sharpness_method=sharpness_method, param_budget=param_budget, progress=progress, batch=1,
                  discrete=discrete, after_transient=start_step == "auto")
    metrics = {"optimizer": describe(optimizer), "models": models, **run_record(ev, 0, models)}
    if not keep_discrete:
        return Comparison(metrics, trajectories(ev, 0), ev.timings)
    return Comparison(metrics, trajectories(ev, 0), ev.timings, ev.discrete, source)
