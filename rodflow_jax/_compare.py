"""Discrete optimizer, stable flow, rod flow and central flow from one state, side by side."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from . import _metrics as M
from ._discrete import DiscreteRun, run_discrete
from ._errors import InputError
from ._integrate import FlowRun, SolverConfig, integrate
from ._sharpness import optimizer_sharpness
from .flows import FLOW_KINDS, check_inertial, make_flow
from .flows._central import check_supported, variance_trajectory
from .optimizers import AbstractOptimizer, describe

FLOWS = FLOW_KINDS
MODELS = ("discrete", *FLOW_KINDS)
DEFAULT_MODELS = ("discrete", "stable", "rod")  # central costs Hessian eigenvectors: ask for it


def default_start_step(optimizer: AbstractOptimizer) -> int:
    """``ceil(10 / (1 - beta))`` for momentum and Adam-type methods (their transient), else 0."""
    hp = optimizer.hyperparameters()
    beta = hp.get("momentum", hp.get("b1"))
    if beta is None:
        return 0
    return int(math.ceil(10.0 / (1.0 - float(beta)) - 1e-9))


@dataclasses.dataclass
class Comparison:
    """What :func:`compare` returns: JSON-ready metrics and per-step numpy trajectories."""

    metrics: dict[str, Any]
    trajectories: dict[str, np.ndarray]

    def save(self, out_dir) -> Path:
        """Write ``metrics.json``, ``trajectories.npz`` and PNG figures to ``out_dir``.

        Written completely or not at all (a temporary folder renamed into place).
        """
        from ._io import atomic_dir, write_json, write_npz
        from ._plot import plot_comparison

        with atomic_dir(out_dir) as tmp:
            write_json(tmp / "metrics.json", self.metrics)
            write_npz(tmp / "trajectories.npz", self.trajectories)
            plot_comparison(self.trajectories, self.metrics, tmp)
        return Path(out_dir)


def check_problem(loss_fn, params0) -> None:
    """Raise :class:`InputError` unless ``params0`` has floating leaves and ``loss_fn(params0)``
    is a finite real scalar."""
    leaves = jax.tree.leaves(params0)
    if not leaves:
        raise InputError("params0 has no array leaves")
    for x in leaves:
        if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            raise InputError(f"parameters must be floating-point arrays, got dtype {jnp.asarray(x).dtype}")
    try:
        value = loss_fn(params0)
    except Exception as e:  # user code: report, do not crash
        raise InputError(f"loss_fn(params0) raised {type(e).__name__}: {e}") from None
    shape = jnp.shape(value)
    if shape != ():
        raise InputError(f"loss_fn must return a scalar, got shape {shape}")
    if not bool(jnp.isfinite(value)):
        raise InputError(f"loss is not finite at the initial parameters ({float(value)})")


def _rows(tree) -> np.ndarray:
    """Stacked pytree (leading axis m) -> (m, d) matrix, leaves in ``ravel_pytree`` order."""
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)


def _index(tree, i):
    return jax.tree.map(lambda x: jnp.asarray(x[i]), tree)


def _param_grid(n_params: int, num_steps: int, budget: float) -> np.ndarray:
    every = max(1, math.ceil(n_params * (num_steps + 1) / budget))
    return np.arange(0, num_steps, every)


@eqx.filter_jit
def _probe_one(optimizer, loss_fn, params, slow, v0, *, k, method):
    """One probe, compiled once per (loss, structure) and shared by discrete, stable and rod."""
    return optimizer_sharpness(optimizer, loss_fn, params, slow, k, method, v0=v0)


def _probe(optimizer, loss_fn, params, slows, idx, k, method, desc, progress):
    """Sharpness and threshold at rows ``idx`` of stacked ``params``/``slows``.

    Lanczos probes are warm-started from the previous probe's eigenvectors.
    """
    f = functools.partial(_probe_one, optimizer, loss_fn, k=k, method=method)
    out = np.full((len(idx), k), np.nan)
    thr = np.full(len(idx), np.nan)
    it = idx
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(idx, desc=f"sharpness {desc}", leave=False)
    v0 = None
    for j, i in enumerate(it):
        p = _index(params, i)
        if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p)):
            continue
        probe = f(p, _index(slows, i), v0)
        out[j, : probe.eigenvalues.shape[0]] = np.asarray(probe.eigenvalues)
        thr[j] = float(probe.threshold)
        if np.all(np.isfinite(np.asarray(probe.vectors))):
            v0 = probe.vectors
    return out, thr


def _flow_start(run: DiscreteRun, start_step: int):
    z0, s0 = run.state_at(start_step)
    z1, s1 = run.state_at(start_step + 1)
    return z0, s0, z1, s1


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
    exact_slow_feed: bool = True,
    progress: bool = False,
    param_budget: float = 2e7,
) -> Comparison:
    """Run the discrete optimizer and the requested flows from one state and compare them.

    The flows start from the discrete state at ``start_step`` K (``"auto"``:
    :func:`default_start_step`): the rod at ``c = (z_K + z_{K+1})/2``, ``r = (z_{K+1} - z_K)/2``,
    the stable flow at ``z_K``. At each step k >= K the flows' centres are compared with the
    discrete midpoint ``mid_k = (z_k + z_{k+1})/2``::

        param_rel_error(k) = ||centre(k) - mid_k|| / ||mid_k - mid_K||

    Parameters are kept at every step unless ``n_params * num_steps`` exceeds
    ``param_budget`` floats, in which case on an even grid. Sharpness (the quantity the
    optimizer's threshold is on) is probed every ``probe_every`` steps.
    """
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise InputError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if "central" in models:
        check_supported(optimizer)
    if "inertial" in models or "inertial_stable" in models:
        check_inertial(optimizer)
    K = default_start_step(optimizer) if start_step == "auto" else int(start_step)
    if num_steps < 2:
        raise InputError(f"steps must be at least 2, got {num_steps}")
    if not 0 <= K <= num_steps - 2:
        raise InputError(f"start step must lie in [0, steps - 2] = [0, {num_steps - 2}], got {K}")
    if top_k < 1:
        raise InputError(f"top-k must be at least 1, got {top_k}")
    if probe_every is not None and probe_every < 1:
        raise InputError(f"probe-every must be at least 1, got {probe_every}")
    check_problem(loss_fn, params0)
    flows = [m for m in FLOWS if m in models]
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params0))
    grid = _param_grid(n_params, num_steps, param_budget)
    probe_every = probe_every or max(1, num_steps // 50)
    probe_every = max(probe_every, int(grid[1] - grid[0]) if len(grid) > 1 else 1)
    save = np.unique(np.concatenate([grid, grid + 1, [K, K + 1]]))
    timings: dict[str, float] = {}

    t = time.perf_counter()
    run = run_discrete(optimizer, loss_fn, params0, num_steps, save_steps=save, progress=progress)
    timings["discrete"] = time.perf_counter() - t

    steps_all = np.arange(num_steps + 1)
    traj: dict[str, np.ndarray] = {"step": steps_all, "discrete_loss": run.loss}
    avg_loss = 0.5 * (run.loss[:-1] + run.loss[1:])  # (L(z_k) + L(z_{k+1}))/2, k = 0..N-1
    traj["discrete_avg_loss"] = np.append(avg_loss, np.nan)

    # discrete midpoints on the grid
    pos = {int(s): i for i, s in enumerate(run.saved_steps)}
    P = _rows(run.params)
    mid = np.stack([0.5 * (P[pos[k]] + P[pos[k + 1]]) for k in grid])
    with np.errstate(all="ignore"):  # a diverged run has inf/NaN rows: they stay NaN here
        half = np.stack([0.5 * np.linalg.norm(P[pos[k + 1]] - P[pos[k]]) for k in grid])
    mid_K = 0.5 * (P[pos[K]] + P[pos[K + 1]])
    disc_var = M.moving_average(half**2)  # smoothed ||r_k||^2 = ||(z_{k+1} - z_k)/2||^2 on the grid

    # discrete sharpness
    probe_idx = [pos[int(k)] for k in grid if k % probe_every == 0]
    probe_steps = run.saved_steps[probe_idx]
    ev, thr = _probe(optimizer, loss_fn, run.params, run.slow, probe_idx, top_k, sharpness_method, "discrete", progress)
    traj["discrete_sharpness_step"] = probe_steps
    traj["discrete_sharpness"] = ev
    traj["discrete_threshold"] = thr
    ratio = ev[:, 0] / thr
    onset = M.eos_onset_step(probe_steps, ratio)

    metrics: dict[str, Any] = {
        "optimizer": describe(optimizer),
        "num_steps": num_steps,
        "start_step": K,
        "num_params": n_params,
        "threshold_quantity": optimizer.threshold_quantity,
        "threshold": M.last_finite(thr),
        "eos_onset_step": onset,
        "eos_fraction": M.eos_fraction(probe_steps, ratio),
        "discrete": {
            "final_loss": M.last_finite(run.loss),
            "diverged": run.diverged,
            "diverged_at": run.diverged_at,
            "sharpness_final": M.last_finite(ev[:, 0]),
        },
    }
    if run.diverged and run.diverged_at <= K + 1:
        for name in flows:
            metrics[name] = {"failed": True, "failed_at": K, "message": "discrete run diverged before the start step"}
        metrics["timings_s"] = timings
        return Comparison(metrics, traj)

    z0, s0, z1, s1 = _flow_start(run, K)
    flow_grid = grid[grid >= K]
    in_flow = grid >= K
    late = M.late_window(flow_grid, K, num_steps)
    disc_ok = np.isfinite(avg_loss[flow_grid])
    for name in flows:
        options = {"exact_slow_feed": exact_slow_feed} if name == "rod" else {}
        flow, y0 = make_flow(name, optimizer, loss_fn, z0, s0, z1, s1, **options)
        config = (solver or {}).get(name)
        t = time.perf_counter()
        fr: FlowRun = integrate(flow, y0, K, num_steps - 1, param_steps=flow_grid, config=config, progress=progress)
        timings[name] = time.perf_counter() - t
        C = _rows(fr.centre)
        err = M.param_rel_error(C, mid[in_flow], mid_K)
        err = np.where(disc_ok, err, np.nan)
        loss_full = np.full(num_steps + 1, np.nan)
        loss_full[fr.steps] = fr.loss
        traj[f"{name}_loss"] = loss_full
        err_full = np.full(num_steps + 1, np.nan)
        err_full[flow_grid] = err
        traj[f"{name}_param_error"] = err_full
        lerr = M.loss_rel_error(fr.loss, avg_loss[K:num_steps])
        fidx = [i for i, k in enumerate(flow_grid) if k % probe_every == 0]
        fev, fthr = _probe(optimizer, loss_fn, fr.centre, fr.slow, fidx, top_k, sharpness_method, name, progress)
        traj[f"{name}_sharpness_step"] = flow_grid[fidx]
        traj[f"{name}_sharpness"] = fev
        traj[f"{name}_threshold"] = fthr
        entry = {
            "param_rel_error_max": M.nan_max(err[late]),
            "param_rel_error_final": M.last_finite(err),
            "loss_rel_error_mean": float(np.nanmean(lerr)) if np.isfinite(lerr).any() else None,
            "loss_window_log_error": M.windowed_log_loss_error(fr.loss, avg_loss[K:num_steps]),
            "sharpness_final": M.last_finite(fev[:, 0]),
            "sharpness_ratio_final": M.last_finite(fev[:, 0] / fthr),
            "failed": fr.failed,
            "failed_at": fr.failed_at,
            "message": fr.message,
            "solver_steps": fr.solver_steps,
            "rejected_steps": fr.rejected_steps,
        }
        if fr.half_norm is not None:
            hn = np.full(num_steps + 1, np.nan)
            hn[fr.steps] = fr.half_norm
            traj[f"{name}_half_norm"] = hn
            entry["variance_window_log_error"] = M.windowed_log_loss_error(hn[flow_grid] ** 2, disc_var[in_flow])
        if name == "central":  # tr Sigma = E||x||^2 against the iterates' smoothed ||r_k||^2
            var = np.asarray(variance_trajectory(flow, fr.centre, fr.slow))
            vfull = np.full((num_steps + 1, var.shape[1]), np.nan)
            vfull[flow_grid] = var
            traj["central_variance"] = vfull
            entry["variance_window_log_error"] = M.windowed_log_loss_error(var.sum(axis=1), disc_var[in_flow])
        metrics[name] = entry
    dh = np.full(num_steps + 1, np.nan)
    dh[grid] = half
    traj["discrete_half_norm"] = dh
    dv = np.full(num_steps + 1, np.nan)
    dv[grid] = disc_var
    traj["discrete_variance"] = dv
    if "central" in metrics and "rod" in metrics:
        a, b = metrics["central"].get("param_rel_error_final"), metrics["rod"].get("param_rel_error_final")
        metrics["central_rod_error_ratio_final"] = a / b if a and b else None
    if "stable" in metrics and "rod" in metrics:
        a, b = metrics["stable"].get("param_rel_error_final"), metrics["rod"].get("param_rel_error_final")
        metrics["error_ratio_final"] = a / b if a and b else None
        a, b = metrics["stable"].get("param_rel_error_max"), metrics["rod"].get("param_rel_error_max")
        metrics["error_ratio_max"] = a / b if a and b else None
    metrics["timings_s"] = timings
    return Comparison(metrics, traj)
