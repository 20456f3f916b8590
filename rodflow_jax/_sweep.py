r"""Sweeps: every (hyperparameter, seed) configuration in one vmapped, jitted computation per model.

The configuration axis is the cartesian product of the hyperparameter grid and the seeds. The
optimizers of all configurations are stacked into one optimizer whose hyperparameter leaves
have a leading batch axis (hyperparameters are array leaves, so an optimizer is vmappable), the
initial parameters of all seeds are stacked likewise, and each model is evaluated by
``jax.vmap`` of a single-configuration function under one ``jit``:

* discrete: a ``lax.scan`` in chunks of ``probe_every`` steps (the same compiled chunk is
  called once per chunk, which drives the progress bar); a configuration whose loss or state
  stops being finite is *frozen* (``where``) from that step on, so NaNs never enter the
  arithmetic of the others; a vmapped, warm-started Lanczos probe at each chunk end records
  the (preconditioned) sharpness and the optimizer's threshold;
* stable and rod flows: a vmapped ``diffeqsolve`` (``throw=False``; an event stops a
  configuration whose state blows up, so it does not burn the shared step budget), started at
  one common step K from the discrete states; failure is recorded per configuration.

``devices="all"`` shards the configuration axis over all local devices (a 1-D ``Mesh`` and
``NamedSharding``; the axis is padded to a multiple of the device count with copies of the last
configuration, dropped again at the end). Everything else is unchanged, so the results equal
the unsharded ones.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from . import _metrics as M
from ._compare import check_problem, default_start_step
from ._discrete import states_at
from ._errors import InputError
from ._integrate import _solve, default_solver
from ._sharpness import optimizer_sharpness
from ._tree import tree_all_finite, tree_norm, tree_where
from .flows import make_flow
from .optimizers import make_optimizer
from .optimizers._registry import hyperparameter_names

SWEEP_MODELS = ("discrete", "stable", "rod")
MEAN_FRACTION = 0.2  # mean_loss averages the last 20% of the steps
BLOWUP = 1e6  # a loss (discrete) or state norm (flows) above BLOWUP * (1 + initial) counts as diverged


# --- configurations -------------------------------------------------------------------------
def configurations(grid: dict[str, Sequence[float]], seeds: Sequence[int]) -> list[tuple[dict, int]]:
    """The cartesian product of the grid's values (in the grid's key order) and the seeds."""
    names = list(grid)
    values = [list(grid[n]) for n in names]
    return [(dict(zip(names, combo)), int(s)) for combo in itertools.product(*values) for s in seeds]


def stack(trees):
    """Stack a list of identically structured pytrees along a new leading axis."""
    return jax.tree.map(lambda *x: jnp.stack([jnp.asarray(v) for v in x]), *trees)


def _resolve_problem(problem, optimizer_name):
    """``(make(seed) -> (loss_fn, params0), default hyperparameters, default steps, label)``."""
    from .problems import Problem, get_problem

    if isinstance(problem, str):
        problem = get_problem(problem)
    if isinstance(problem, Problem):
        hp = {"learning_rate": problem.learning_rates.get(optimizer_name),
              **problem.hyperparameters.get(optimizer_name, {})}
        return problem.make, hp, problem.default_steps, problem.name
    if callable(problem):
        return problem, {}, 500, getattr(problem, "__name__", "user")
    raise InputError("problem must be a problem name, a Problem or a function make(seed) -> (loss_fn, params0)")


def _seed_problems(make: Callable, seeds: Sequence[int]):
    """The loss function of the first seed and the stacked initial parameters of all seeds."""
    loss_fn, p0 = make(seeds[0])
    params, structure = [p0], jax.tree.structure(p0)
    for s in seeds[1:]:
        loss_s, p = make(s)
        if jax.tree.structure(p) != structure:
            raise InputError(f"seed {s} gives parameters with a different structure from seed {seeds[0]}")
        a, b = float(loss_fn(p)), float(loss_s(p))
        if not np.isclose(a, b, rtol=1e-6, atol=0.0):  # one loss_fn serves every seed
            raise InputError(f"the loss of make({s}) differs from that of make({seeds[0]}) ({b:g} vs {a:g}): "
                             "a sweep needs data that do not depend on the seed")
        params.append(p)
    check_problem(loss_fn, p0)
    return loss_fn, params


# --- sharding -------------------------------------------------------------------------------
def config_sharding(devices) -> jax.sharding.NamedSharding | None:
    """A ``NamedSharding`` splitting the leading (configuration) axis over ``devices``."""
    if devices is None:
        return None
    devs = jax.devices() if devices == "all" else list(devices)
    mesh = jax.sharding.Mesh(np.asarray(devs), ("config",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("config"))


def pad_and_shard(tree, sharding):
    """Pad the leading axis to a multiple of the device count (repeating the last row) and place it."""
    if sharding is None:
        return tree
    n = sharding.mesh.size
    b = jax.tree.leaves(tree)[0].shape[0]
    extra = -b % n

    def pad(x):
        x = jnp.asarray(x)
        return jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)]) if extra else x

    return jax.device_put(jax.tree.map(pad, tree), sharding)


# --- one configuration's pieces (vmapped below) --------------------------------------------
def _probe(optimizer, loss_fn, params, slow, v, num_iter):
    """Warm-started Lanczos: (top eigenvalue, threshold, next start vector); NaN if not finite."""
    ok = tree_all_finite(params) & tree_all_finite(slow)
    safe_p = tree_where(ok, params, jax.tree.map(jnp.zeros_like, params))
    pr = optimizer_sharpness(optimizer, loss_fn, safe_p, slow, 1, "lanczos", num_iter=num_iter, v0=v)
    vec = pr.vectors[:, 0]
    good = ok & jnp.all(jnp.isfinite(vec))
    return jnp.where(ok, pr.eigenvalues[0], jnp.nan), pr.threshold, jnp.where(good, vec, v)


class _Carry(eqx.Module):
    phase: Any
    slow: Any
    prev: Any  # params one step before ``phase``
    alive: jax.Array
    diverged_at: jax.Array
    v: jax.Array  # Lanczos warm start
    limit: jax.Array  # a loss above this counts as diverged: BLOWUP * (1 + |L(z_0)|)


def _chunk_one(optimizer, loss_fn, carry: _Carry, ks, num_steps, probe_iter):
    """Steps ``ks`` of one configuration: losses L(z_k), then a probe and the midpoint at the end."""
    vg = jax.value_and_grad(loss_fn)

    def body(c: _Carry, k):
        loss, g = vg(c.phase.params)
        finite = jnp.isfinite(loss) & (jnp.abs(loss) < c.limit) & tree_all_finite(c.phase)
        record = k <= num_steps
        alive = c.alive & (finite | ~record)
        new_phase, new_slow = optimizer.step(c.phase, c.slow, g)
        move = alive & (k < num_steps)
        c2 = _Carry(
            tree_where(move, new_phase, c.phase),
            tree_where(move, new_slow, c.slow),
            tree_where(move, c.phase.params, c.prev),
            alive,
            jnp.where(c.alive & ~alive, k.astype(c.diverged_at.dtype), c.diverged_at),
            c.v,
            c.limit,
        )
        return c2, jnp.where(alive & record, loss, jnp.nan)

    carry, losses = jax.lax.scan(body, carry, ks)
    sharp, thr, v = _probe(optimizer, loss_fn, carry.phase.params, carry.slow, carry.v, probe_iter)
    mid = 0.5 * (ravel_pytree(carry.prev)[0] + ravel_pytree(carry.phase.params)[0])
    carry = dataclasses.replace(carry, v=v)
    nan = jnp.full_like(sharp, jnp.nan)
    return carry, losses, jnp.where(carry.alive, sharp, nan), thr, jnp.where(carry.alive, mid, jnp.nan)


@eqx.filter_jit
def _discrete_chunk(optimizer, loss_fn, carry, ks, num_steps, probe_iter):
    f = lambda o, c: _chunk_one(o, loss_fn, c, ks, num_steps, probe_iter)  # noqa: E731
    return jax.vmap(f)(optimizer, carry)


def _init_carry(optimizer, loss_fn, params, key):
    phase, slow = optimizer.init(params)
    flat = ravel_pytree(params)[0]
    v = jax.random.normal(key, flat.shape, flat.dtype)
    limit = BLOWUP * (1.0 + jnp.abs(loss_fn(params)))
    return _Carry(phase, slow, params, jnp.ones((), bool), jnp.full((), -1), v, limit)


@eqx.filter_jit
def _init_carries(optimizer, loss_fn, params):
    return jax.vmap(lambda o, p: _init_carry(o, loss_fn, p, jax.random.PRNGKey(0)))(optimizer, params)


@eqx.filter_jit
def _flow_batch(kind, optimizer, loss_fn, params, mids, mid0, K, num_steps, grid, probe_iter):
    """Vmapped flows: predicted loss at every step, sharpness and parameter error on ``grid``."""
    ts = jnp.arange(K, num_steps + 1)
    dtype = jax.tree.leaves(params)[0].dtype
    ts, gts = ts.astype(dtype), jnp.asarray(grid, dtype)

    def one(opt, p, mids_i, mid0_i):
        flow, y0 = make_flow(kind, opt, loss_fn, *states_at(opt, loss_fn, p, K))
        bound = BLOWUP * (1.0 + tree_norm(y0))
        event = diffrax.Event(lambda t, y, args, **kw: ~(tree_all_finite(y) & (tree_norm(y) < bound)))
        config = default_solver(flow, dtype)
        sol = _solve(flow, y0, ts[0], ts[-1], ts, gts, config, config.max_steps(num_steps - K), False, event)
        (loss, _), (centre, slow) = sol.ys
        ok = sol.result == diffrax.RESULTS.successful

        def probe(v, x):
            c, s = x
            sharp, thr, v = _probe(opt, loss_fn, c, s, v, probe_iter)
            return v, (sharp, thr)

        v0 = jax.random.normal(jax.random.PRNGKey(0), mid0_i.shape, mid0_i.dtype)
        _, (sharp, thr) = jax.lax.scan(probe, v0, (centre, slow))
        flat = jax.vmap(lambda c: ravel_pytree(c)[0])(centre)
        err = jnp.linalg.norm(flat - mids_i, axis=-1) / jnp.linalg.norm(mids_i - mid0_i, axis=-1)
        nan = lambda x: jnp.where(jnp.isfinite(x), x, jnp.nan)  # noqa: E731
        return nan(loss), nan(sharp), thr, nan(err), ok, sol.stats["num_steps"]

    return jax.vmap(one)(optimizer, params, mids, mid0)


# --- the sweep ------------------------------------------------------------------------------
@dataclasses.dataclass
class SweepResult:
    """One JSON-ready record per configuration, and the per-step arrays behind them."""

    records: list[dict]
    arrays: dict[str, np.ndarray]
    info: dict[str, Any]

    def save(self, out_dir) -> Path:
        """Write ``sweep.json`` and the figures to ``out_dir``, completely or not at all."""
        from ._io import atomic_dir, write_json, write_npz
        from ._sweep_plot import plot_sweep

        with atomic_dir(out_dir) as tmp:
            write_json(tmp / "sweep.json", self.records)
            write_json(tmp / "sweep_info.json", self.info)
            write_npz(tmp / "sweep_arrays.npz", self.arrays)
            plot_sweep(self.records, tmp)
        return Path(out_dir)


def prepare_batch(make, optimizer_name, grid, seeds, fixed):
    """``(configs, optimizers, loss_fn, stacked optimizer, stacked params0, fixed hyperparameters)``."""
    configs = configurations(grid, seeds)
    valid = set(hyperparameter_names(optimizer_name))
    base = {k: v for k, v in fixed.items() if k in valid and v is not None}
    opts = [make_optimizer(optimizer_name, **{**base, **hp}) for hp, _ in configs]  # validates each
    loss_fn, seed_params = _seed_problems(make, seeds)
    by_seed = dict(zip(seeds, seed_params))
    dtype = jnp.result_type(*jax.tree.leaves(seed_params[0]))
    optimizer = jax.tree.map(lambda x: x.astype(dtype), stack(opts))
    params = stack([by_seed[s] for _, s in configs])
    return configs, opts, loss_fn, optimizer, params, base


def _validate(optimizer_name, grid, fixed, models, num_steps):
    valid = hyperparameter_names(optimizer_name)
    unknown = sorted((set(grid) | set(fixed)) - set(valid))
    if unknown:
        raise InputError(
            f"optimizer '{optimizer_name}' takes no hyperparameter {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(valid)}"
        )
    for name, values in grid.items():
        if len(values) == 0:
            raise InputError(f"no values given for {name}")
    bad = [m for m in models if m not in SWEEP_MODELS]
    if bad or not models:
        raise InputError(f"unknown model(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SWEEP_MODELS)}")
    if num_steps < 2:
        raise InputError(f"steps must be at least 2, got {num_steps}")


def _progress(iterable, desc, progress):
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="chunk", leave=False)


def _say(progress, msg):
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(msg)


def run_discrete_batch(optimizer, loss_fn, params, num_steps, probe_every, probe_iter, sharding=None, progress=False):
    """The vmapped discrete runs: losses (B, N+1), probes (B, G), midpoints (B, G, n)."""
    carry = _init_carries(optimizer, loss_fn, params)
    n_chunks = -(-(num_steps + 1) // probe_every)
    losses, sharp, thr, mids = [], [], [], []
    for c in _progress(range(n_chunks), "discrete (vmapped)", progress):
        ks = jnp.arange(c * probe_every, (c + 1) * probe_every)
        carry, l, s, t, m = _discrete_chunk(optimizer, loss_fn, carry, ks, num_steps, probe_iter)
        losses.append(np.asarray(l))
        sharp.append(np.asarray(s))
        thr.append(np.asarray(t))
        mids.append(m)
    loss = np.concatenate(losses, axis=1)[:, : num_steps + 1]
    probe_steps = np.minimum(np.arange(1, n_chunks + 1) * probe_every, num_steps)
    return dict(
        loss=loss, sharpness=np.stack(sharp, 1), threshold=np.stack(thr, 1), probe_steps=probe_steps,
        mids=jnp.stack(mids, 1), diverged_at=np.asarray(carry.diverged_at), alive=np.asarray(carry.alive),
    )


def sweep(
    problem,
    optimizer_name: str,
    grid: dict[str, Sequence[float]],
    seeds: Sequence[int] = (0,),
    num_steps: int | None = None,
    *,
    models: Sequence[str] = SWEEP_MODELS,
    fixed: dict[str, float] | None = None,
    start_step: int | str = "auto",
    probe_every: int | None = None,
    probe_iter: int = 8,
    devices=None,
    progress: bool = False,
) -> SweepResult:
    """Evaluate every (grid point, seed) configuration with ``vmap``, one jitted computation per model.

    ``problem`` is a built-in name, a :class:`~rodflow_jax.problems.Problem`, or ``make(seed) ->
    (loss_fn, params0)`` (the data, and so ``loss_fn``, must not depend on the seed: the first
    seed's is used). Hyperparameters not in ``grid`` come from ``fixed``, then the problem's
    defaults. The flows all start at one step K (``"auto"``: the largest
    :func:`default_start_step` over the configurations). ``devices="all"`` shards the
    configuration axis over all local devices.

    Compilations are cached on the identity of ``loss_fn``: a second sweep reuses them only if
    ``make`` returns the same ``loss_fn`` object (e.g. pass ``functools.lru_cache(problem.make)``).
    """
    make, defaults, default_steps, label = _resolve_problem(problem, optimizer_name)
    fixed = dict(fixed or {})
    num_steps = default_steps if num_steps is None else int(num_steps)
    models = list(models)
    _validate(optimizer_name, grid, fixed, models, num_steps)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise InputError("at least one seed is needed")
    batch = prepare_batch(make, optimizer_name, grid, seeds, {**defaults, **fixed})
    configs, opts, loss_fn, optimizer, params, base = batch
    B = len(configs)
    K = max(default_start_step(o) for o in opts) if start_step == "auto" else int(start_step)
    if not 0 <= K <= num_steps - 2:
        raise InputError(f"start step must lie in [0, steps - 2] = [0, {num_steps - 2}], got {K}")
    probe_every = probe_every or max(1, num_steps // 20)
    sharding = config_sharding(devices)
    optimizer, params = pad_and_shard((optimizer, params), sharding)

    _say(progress, f"sweep: {B} configurations x {num_steps} steps, models {', '.join(models)}"
         + (f", sharded over {sharding.mesh.size} devices" if sharding else ""))
    disc = run_discrete_batch(optimizer, loss_fn, params, num_steps, probe_every, probe_iter, sharding, progress)
    arrays: dict[str, np.ndarray] = {"discrete_loss": disc["loss"][:B], "probe_steps": disc["probe_steps"]}
    grid_steps = disc["probe_steps"] - 1  # the midpoints (z_k + z_{k+1})/2 sit at k = probe step - 1
    in_flow = grid_steps >= K
    flow_grid = grid_steps[in_flow]
    flows = {}
    for kind in ("stable", "rod"):
        if kind not in models:
            continue
        _say(progress, f"sweep: {kind} flows, {B} configurations in one vmapped diffeqsolve")
        out = run_flow_batch(kind, optimizer, loss_fn, params, disc, K, num_steps, probe_iter)
        flows[kind] = [np.asarray(x)[:B] for x in out]
        arrays[f"{kind}_loss"] = flows[kind][0]
    records = _records(configs, disc, flows, B, K, num_steps, flow_grid, models)
    info = {"problem": label, "optimizer": optimizer_name, "num_steps": num_steps, "start_step": K,
            "seeds": seeds, "grid": {k: list(map(float, v)) for k, v in grid.items()}, "fixed": base,
            "models": models, "probe_every": probe_every, "num_configurations": B,
            "devices": sharding.mesh.size if sharding else 1}
    return SweepResult(records, arrays, info)


@eqx.filter_jit
def _mid0_jit(optimizer, loss_fn, params, K):
    def one(o, p):
        z0, _, z1, _ = states_at(o, loss_fn, p, K)
        return 0.5 * (ravel_pytree(z0.params)[0] + ravel_pytree(z1.params)[0])

    return jax.vmap(one)(optimizer, params)


def run_flow_batch(kind, optimizer, loss_fn, params, disc, K, num_steps, probe_iter):
    """The vmapped ``kind`` flows from step K, compared with the discrete batch ``disc`` on its grid.

    Returns ``(loss (B, N-K+1), sharpness, threshold, param_rel_error (B, G), ok (B,), solver steps (B,))``.
    """
    grid_steps = disc["probe_steps"] - 1
    in_flow = grid_steps >= K
    mid0 = _mid0_jit(optimizer, loss_fn, params, K)
    return _flow_batch(kind, optimizer, loss_fn, params, disc["mids"][:, in_flow], mid0, K, num_steps,
                       grid_steps[in_flow], probe_iter)


def _mean_last(x, steps, num_steps):
    window = steps >= num_steps - max(1, int(num_steps * MEAN_FRACTION))
    w = x[window]
    return float(np.mean(w)) if w.size and np.all(np.isfinite(w)) else None


def _records(configs, disc, flows, B, K, num_steps, flow_grid, models):
    steps = np.arange(num_steps + 1)
    flow_steps = np.arange(K, num_steps + 1)
    pst = disc["probe_steps"]
    out = []
    for i, (hp, seed) in enumerate(configs):
        rec: dict[str, Any] = {"hyperparameters": {k: float(v) for k, v in hp.items()}, "seed": seed}
        ratio = disc["sharpness"][i] / disc["threshold"][i]
        div = not bool(disc["alive"][i])
        if "discrete" in models:
            rec["discrete"] = {
                "final_loss": M.last_finite(disc["loss"][i]) if not div else None,
                "mean_loss": _mean_last(disc["loss"][i], steps, num_steps),
                "eos_onset_step": M.eos_onset_step(pst, ratio),
                "sharpness_final": M.last_finite(disc["sharpness"][i]),
                "threshold_final": M.last_finite(disc["threshold"][i]),
                "sharpness_ratio_final": M.last_finite(ratio),
                "diverged": div,
                "diverged_at": int(disc["diverged_at"][i]) if div else None,
            }
        for kind, (loss, sharp, thr, err, ok, nsteps) in flows.items():
            r = sharp[i] / thr[i]
            failed = not bool(ok[i]) or not np.all(np.isfinite(loss[i]))
            late = M.late_window(flow_grid, K, num_steps)
            rec[kind] = {
                "final_loss": float(loss[i][-1]) if np.isfinite(loss[i][-1]) else None,
                "mean_loss": _mean_last(loss[i], flow_steps, num_steps),
                "eos_onset_step": M.eos_onset_step(flow_grid, r),
                "sharpness_final": M.last_finite(sharp[i]),
                "sharpness_ratio_final": M.last_finite(r),
                "param_rel_error_final": M.last_finite(err[i]),
                "param_rel_error_max": M.nan_max(err[i][late]),
                "failed": failed,
                "solver_steps": int(nsteps[i]),
            }
        out.append(rec)
    return out


def values_from_range(text: str, flag: str = "value") -> list[float]:
    """``"A:B:N"`` (N evenly spaced values), ``"A:B:N:log"`` (geometric) or ``"v1,v2,..."``."""
    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] not in ("log", "lin")):
                raise ValueError
            a, b, n = float(parts[0]), float(parts[1]), int(parts[2])
            if n < 1:
                raise ValueError
            log = len(parts) == 4 and parts[3] == "log"
            if log and (a <= 0 or b <= 0):
                raise InputError(f"{flag}: a log range needs positive ends, got {text!r}")
            vals = np.geomspace(a, b, n) if log else np.linspace(a, b, n)
            return [float(v) for v in vals]
        vals = [float(v) for v in text.split(",") if v.strip()]
        if not vals:
            raise ValueError
        return vals
    except InputError:
        raise
    except ValueError:
        raise InputError(f"{flag} must be A:B:N[:log] or a comma list of numbers, got {text!r}") from None


__all__ = ["sweep", "SweepResult", "configurations", "values_from_range", "config_sharding"]
