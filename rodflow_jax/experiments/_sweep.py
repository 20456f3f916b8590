r"""Sweeps: every (hyperparameter, seed) configuration as one batch, a vmapped compare.

The configuration axis is the cartesian product of the hyperparameter grid and the seeds. The
optimizers of all configurations are stacked into one optimizer whose hyperparameter leaves
have a leading batch axis (hyperparameters are array leaves, so an optimizer is vmappable), the
initial parameters of all seeds likewise, and the batch goes through the same
:func:`~._evaluate.evaluate` as ``compare``: jitted, vmapped calls of ``batch_size``
configurations per kernel and model, each configuration at the same place of its call in every
layout. So each row of ``sweep.json`` is the record ``compare`` writes for that configuration
(exactly so for a sweep of one). A
configuration whose discrete run diverges is frozen at that step, and its flows stop there; it
never spreads NaNs into the others.

``devices="all"`` shards the configuration axis over all devices (:mod:`._sharding`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InputError
from ..optimizers import describe
from ._engine import stack_trees
from ._evaluate import _num_params, check_options, evaluate, flows_start
from ._merge import check_shard, fingerprint, shard_range
from ._progress import say
from ._records import run_record
from ._sharding import config_sharding, pad_and_shard
from ._spec import (
    DEFAULT_MODELS,
    check_problem,
    check_single_optimizer,
    differentiable,
    grid_optimizers,
    resolve_models,
    resolve_problem,
    resolve_start,
    resolve_steps,
)


def configurations(grid: dict[str, Sequence[float]], seeds: Sequence[int]) -> list[tuple[dict, int]]:
    """The cartesian product of the grid's values (in the grid's key order) and the seeds."""
    names = list(grid)
    values = [list(grid[n]) for n in names]
    return [(dict(zip(names, combo)), int(s)) for combo in itertools.product(*values) for s in seeds]


def _seed_problems(make: Callable, seeds: Sequence[int]):
    """The loss function of the first seed and the initial parameters of every seed."""
    loss_fn, p0 = make(seeds[0])
    loss_fn, p0 = differentiable(loss_fn, p0)
    check_problem(loss_fn, p0)
    params, structure = [p0], jax.tree.structure(p0)
    for s in seeds[1:]:
        loss_s, p = make(s)
        loss_s, p = differentiable(loss_s, p)
        if jax.tree.structure(p) != structure:
            raise InputError(f"seed {s} gives parameters with a different structure from seed {seeds[0]}")
        a, b = float(loss_fn(p)), float(loss_s(p))
        if not np.isclose(a, b, rtol=1e-6, atol=0.0):  # one loss_fn serves every seed
            raise InputError(f"the loss of make({s}) differs from that of make({seeds[0]}) ({b:g} vs {a:g}): "
                             "a sweep needs data that do not depend on the seed")
        params.append(p)
    return loss_fn, params


@dataclasses.dataclass
class SweepResult:
    """One JSON-ready record per configuration, and the per-step arrays behind them."""

    records: list[dict]
    arrays: dict[str, np.ndarray]
    info: dict[str, Any]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def save(self, out_dir, *, overwrite: bool = False) -> Path:
        """Write ``sweep.json``, ``sweep_info.json``, ``timings.json``, ``sweep_arrays.npz`` and the
        figures to ``out_dir``, completely or not at all."""
        from .._sweep_plot import plot_sweep
        from ._output import output_dir, write_json, write_npz

        with output_dir(out_dir, overwrite=overwrite, flag="out_dir") as tmp:
            write_json(tmp / "sweep.json", self.records)
            write_json(tmp / "sweep_info.json", self.info)
            write_json(tmp / "timings.json", self.timings)
            write_npz(tmp / "sweep_arrays.npz", self.arrays)
            plot_sweep(self.records, tmp, title=f"{self.info['problem']}, {self.info['optimizer']}")
        return Path(out_dir)


def _check_grid(grid: dict) -> dict:
    """``grid`` with each entry a list of values (one number is a list of one); none empty."""
    out = {}
    for name, values in grid.items():
        values = [values] if np.ndim(values) == 0 else np.asarray(values).ravel().tolist()
        if len(values) == 0:
            raise InputError(f"no values given for {name}")
        out[name] = values
    return out


def sweep(
    problem,
    optimizer_name,
    grid: dict[str, Sequence[float]] | None = None,
    seeds: Sequence[int] = (0,),
    num_steps: int | None = None,
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    fixed: dict[str, float] | None = None,
    opt_args: dict | None = None,
    start_step: int | str = "auto",
    probe_every: int | None = None,
    top_k: int = 1,
    sharpness_method: str = "auto",
    flow_options: dict[str, dict] | None = None,
    devices=None,
    progress=False,
    param_budget: float = 2e7,
    shard: tuple[int, int] | None = None,
    batch_size: int | str = "auto",
) -> SweepResult:
    """Evaluate every (grid point, seed) configuration as one vmapped batch per kernel and model.

    ``problem`` is a built-in name, a user file ``path.py:make``, a
    :class:`~rodflow_jax.problems.Problem`, or ``make(seed) -> (loss_fn, params0)`` (the data,
    and so ``loss_fn``, must not depend on the seed: the first seed's is used). Hyperparameters
    not in ``grid`` come from ``fixed``, then the problem's defaults; an empty grid runs the
    defaults. The flows start at one step K (``"auto"``: the largest default over the
    configurations, and a configuration whose run starts far past its edge starts later, where
    its own initial transient ends: its record's ``start_step``; the flow arrays begin at K, NaN
    before a row's own start). ``devices="all"`` shards the configuration axis over all devices.

    ``optimizer_name`` is one of the nine, ``"optax:NAME"`` (then ``opt_args`` are the
    constructor's other arguments, and any float argument of it can be in ``grid``), or an
    optimizer (e.g. ``from_optax(factory, hyperparameters=...)``), whose
    ``continuous_hyperparameters`` the grid may set.

    ``shard=(i, n)`` evaluates only the i-th of n contiguous slices of the configurations (a job
    array's task; :func:`~._merge.merge_shards` joins them), with K and the probe grid resolved
    over the whole grid so that its rows are those of the whole sweep.

    ``batch_size``: configurations per vmapped call on each device (``"auto"``:
    :func:`resolve_batch_size`). Every layout of one sweep (whole, shards, a mesh of devices) computes
    its rows in calls of this size, the last call padded, so a row's numbers do not depend on the
    layout (:func:`~._engine.row_blocks`).
    """
    if not isinstance(optimizer_name, str):
        check_single_optimizer(optimizer_name, "sweep")
    grid = _check_grid(dict(grid or {}))
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    label = optimizer_name if isinstance(optimizer_name, str) else optimizer_name.name
    spec = resolve_problem(problem, label)
    num_steps = resolve_steps(num_steps, spec.default_steps)
    if isinstance(seeds, (int, np.integer)):
        raise InputError(f"seeds must be a list of seeds, e.g. range({seeds}) or [{seeds}], got the number {seeds}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("at least one seed is needed")
    configs = configurations(grid, seeds)
    B_all = len(configs)
    rows = resolve_batch_size(batch_size, B_all)
    first, stop = (0, B_all) if shard is None else shard_range(B_all, check_shard(shard))
    opts = grid_optimizers(optimizer_name, spec, [hp for hp, _ in configs], fixed, opt_args)  # validates each
    base = {k: v for k, v in describe(opts[0]).items() if k not in grid and k != "name"}
    models = resolve_models(models, opts[0])
    K = resolve_start(start_step, opts, num_steps)  # over the whole grid, also for a shard
    configs, opts = configs[first:stop], opts[first:stop]
    loss_fn, seed_params = _seed_problems(spec.make, seeds)
    opts = [o.prepared(seed_params[0]) for o in opts]
    by_seed = dict(zip(seeds, seed_params))
    dtype = jnp.result_type(*jax.tree.leaves(seed_params[0]))
    optimizer = jax.tree.map(lambda x: jnp.asarray(x, dtype) if hasattr(x, "dtype") else x, stack_trees(opts))
    params = stack_trees([by_seed[s] for _, s in configs])
    check_options(_num_params(params), num_steps, models, flow_options, probe_every, top_k)  # before the banner
    B = len(configs)
    sharding = config_sharding(devices)
    lead = first % (rows * (sharding.mesh.size if sharding else 1))  # a shard's rows at their places in their calls
    optimizer, params = pad_and_shard((optimizer, params), sharding, rows, lead)
    say(progress, f"sweep: {B} configurations x {num_steps} steps, models {', '.join(models)}"
        + (f", shard {shard[0]}/{shard[1]} (configurations {first}..{stop - 1} of {B_all})" if shard else "")
        + (f", sharded over {sharding.mesh.size} devices" if sharding else ""))
    ev = evaluate(loss_fn, optimizer, params, num_steps, K, models, threshold_quantity=opts[0].threshold_quantity,
                  flow_options=flow_options, probe_every=probe_every, top_k=top_k,
                  sharpness_method=sharpness_method, param_budget=param_budget, progress=progress,
                  batch=B_all, rows=rows,  # the whole grid's batch: a shard's step grid and probes are the sweep's
                  after_transient=start_step == "auto")
    records = []
    for i, (hp, seed) in enumerate(configs):
        rec = {"hyperparameters": {k: float(v) for k, v in hp.items()}, "seed": seed,
               "optimizer": describe(opts[i]), "models": models}
        records.append({**rec, **run_record(ev, lead + i, models)})
    mine = slice(lead, lead + B)  # this batch's configurations (the padding dropped)
    arrays = {"discrete_loss": ev.loss[mine], "probe_steps": ev.probe_steps,
              "discrete_sharpness": ev.probes.eigenvalues[mine, :, 0], "discrete_threshold": ev.probes.threshold[mine]}
    # a flow is NaN where it did not start (its run diverged by K + 1), also when no configuration
    # of this batch started it: a row is the same alone, in a shard or in the sweep
    started = flows_start(ev.diverged_at, ev.starts)[mine, None]
    for name in models:
        if name != "discrete":
            f = ev.flows.get(name)
            loss = f.arrays.loss[mine] if f else np.full((B, num_steps - K), np.nan, ev.loss.dtype)
            arrays[f"{name}_loss"] = np.where(started, loss, np.nan)
    info = {"problem": spec.label, "optimizer": label, "num_steps": num_steps, "start_step": K,
            "start_after_transient": start_step == "auto",
            "seeds": seeds, "grid": {k: list(map(float, v)) for k, v in grid.items()}, "fixed": base,
            "models": models, "probe_every": int(ev.probe_steps[1] - ev.probe_steps[0]) if len(ev.probe_steps) > 1
            else None, "num_configurations": B, "devices": sharding.mesh.size if sharding else 1, "batch_size": rows}
    if jax.process_count() > 1:
        info["processes"] = jax.process_count()
    if shard is not None:
        info["shard"] = {"index": int(shard[0]), "count": int(shard[1]), "configurations": [first, stop]}
    info["fingerprint"] = fingerprint({  # everything the shards of one sweep must share
        **{k: info[k] for k in ("problem", "optimizer", "num_steps", "start_step", "start_after_transient", "seeds",
                                "grid", "fixed",
                                "models", "probe_every", "batch_size")},
        "dtype": str(dtype), "every": ev.every, "top_k": top_k, "sharpness_method": sharpness_method,
        "flow_options": {m: (flow_options or {}).get(m) for m in models if (flow_options or {}).get(m)}})
    return SweepResult(records, arrays, info, ev.timings)


def resolve_batch_size(batch_size: int | str, num_configurations: int) -> int:
    """Configurations per vmapped call on each device: ``"auto"`` is 8 on a CPU and 128 on an
    accelerator, never more than the sweep's configurations (so a sweep of one is ``compare``'s
    batch of one).

    Why 8 on a CPU (``benchmarks/sweep_layouts.py``, mlp-digits GD, 16 configurations x 300
    steps, discrete + stable + rod, 2 cores): calls of 2, 4, 8 and 16 rows took 86, 67, 64 and
    60 s. Wider calls gain little more on a CPU, a call runs until its slowest row finishes, and
    a job-array shard is padded to whole calls, so a fixed size small enough for shards of a
    few configurations is kept. On an accelerator wide calls are what it is for; lower it when
    a call does not fit in memory."""
    if batch_size == "auto" or batch_size is None:
        rows = 8 if jax.default_backend() == "cpu" else 128
    else:
        try:
            rows = int(batch_size)
        except (TypeError, ValueError):
            raise InputError(f"batch size must be a positive integer or 'auto', got {batch_size!r}") from None
        if rows < 1 or rows != float(batch_size):
            raise InputError(f"batch size must be a positive integer or 'auto', got {batch_size!r}")
    return max(1, min(rows, num_configurations))


def _finite(values: list[float], flag: str, text: str) -> list[float]:
    """``values`` if each is finite and none repeats (a repeat would run the same rows twice)."""
    if not all(math.isfinite(v) for v in values):
        raise InputError(f"{flag}: every value must be a finite number, got {text!r}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise InputError(f"{flag} lists {', '.join(f'{v:g}' for v in twice)} more than once (the rows would repeat)")
    return values


def values_from_range(text: str, flag: str = "value") -> list[float]:
    """``"A:B:N"`` or ``"A:B:N:lin"`` (N evenly spaced values), ``"A:B:N:log"`` (geometric) or
    ``"v1,v2,..."``: finite, none twice."""
    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in ("log", "lin")):
                raise ValueError
            a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
            if n < 1:
                raise ValueError
            if n == 1 and a != b:
                raise InputError(f"{flag}: {text!r} asks for 1 value between two different ends; give N >= 2, or one value")
            log = len(parts) == 4 and parts[3] == "log"
            if log and (a <= 0 or b <= 0):
                raise InputError(f"{flag}: a log range needs positive ends, got {text!r}")
            vals = np.geomspace(a, b, n) if log else np.linspace(a, b, n)
            return _finite([float(v) for v in vals], flag, text)
        vals = [float(v) for v in text.split(",") if v.strip()]
        if not vals:
            raise ValueError
        return _finite(vals, flag, text)
    except InputError:
        raise
    except ValueError:
        raise InputError(f"{flag} must be A:B:N[:log] or a comma list of numbers, got {text!r}") from None
