"""The three kernels, batched: a rollout, a solve and a probe loop, each vmapped over configurations.

Every driver (compare, sweep, hypergradients, the benchmarks) runs its models through these.
A batch is a stacked optimizer (hyperparameter leaves with a leading axis B) and stacked initial
parameters; compare is a batch of one. Each kernel is one jitted, ``eqx.filter_vmap``-ped call
(chunked along the steps or probes only to show progress and to stay interruptible), so its
compilation is cached on the loss function and the shapes.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .._discrete import init_carry, rollout_chunk
from .._integrate import SolverConfig, default_solver, implicit_retry, is_implicit, solve, solver_name
from .._sharpness import probe_trajectory
from ..flows import flow_kind
from ..flows._registry import resolve
from ._progress import bar
from ._sharding import place, to_host


def stack_trees(trees):
    """Stack like-structured pytrees along a new leading axis (array leaves; other leaves, e.g. a
    schedule, must be shared and are taken from the first).

    Concrete leaves are stacked on the host: ``jnp.stack`` of B arrays compiles one B-operand
    concatenation, whose compile time grows faster than B (measured: 0.38 s for 1,024 scalars,
    9.5 s for 8,192, and a 100,000-configuration sweep sat in it for minutes without a word),
    where ``np.stack`` takes 0.016 s and 0.083 s."""
    def one(*xs):
        if not (eqx.is_array_like(xs[0]) and not callable(xs[0])):
            return xs[0]
        if any(isinstance(x, jax.core.Tracer) for x in xs):
            return jnp.stack([jnp.asarray(x) for x in xs])
        return jnp.asarray(np.stack([np.asarray(x) for x in xs]), dtype=jnp.result_type(xs[0]))

    return jax.tree.map(one, *trees)


def unstack(tree, i: int):
    return jax.tree.map(lambda x: x[i] if eqx.is_array(x) else x, tree)


def placed_like(tree, ref):
    """``tree``'s arrays on the same (configuration-axis) sharding as ``ref``'s, so one kernel
    never mixes a sharded batch with a single-device one (XLA's CPU collectives can stall on it)."""
    arrays = [x for x in jax.tree.leaves(ref) if isinstance(x, jax.Array)]
    sharding = arrays[0].sharding if arrays else None
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return tree
    return jax.tree.map(lambda x: place(x, sharding), tree)


def _sharding_of(tree) -> jax.sharding.NamedSharding | None:
    arrays = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
    sharding = arrays[0].sharding if arrays else None
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


# --- row blocks ---------------------------------------------------------------------------------
def row_blocks(n: int, size: int | None) -> list[np.ndarray]:
    """The rows of each kernel call: consecutive blocks of ``size`` rows (``None``: one call of
    all ``n``), the last padded by repeating the batch's last row, so that every call has one shape.

    Why blocks of a fixed size: XLA's CPU kernels round a batch of 2 rows differently from a
    batch of 4 (and a batch of 1 from both), and a row at position 0 of a call differently from
    the same row at position 1; the other rows' values do not matter. Measured on an unseen tanh
    network on sklearn's diabetes data, RMSProp's stiff stable flow (Kvaerno5+GMRES, 300 steps):
    a configuration took 160 solver steps in a call of 4 rows and 161 in a call of 2; swapping
    the two rows of a call moves the stable flow's loss by 1e-16 and a rod's by 2e-15 in 30
    steps. So a sweep computes row i of its grid at position ``i % size`` of a call of ``size``
    rows whatever its layout (whole, job-array shards: a shard is padded in front to its place,
    :func:`~._sharding.pad_and_shard`), and its rows agree bit for bit between layouts
    (``rodflow sweep --batch-size``)."""
    if size is None or n == 0:
        return [np.arange(n)]
    return [np.minimum(np.arange(s, s + size), n - 1) for s in range(0, n, size)]


def aligned_rows(idx, n: int, rows: int | None):
    """The rows of the whole blocks of ``rows`` (of a batch of ``n``) that hold the rows ``idx``,
    and where ``idx`` sit in them: a retry of some rows recomputes their blocks, so that each row
    keeps its place in its call (``None``: just ``idx``)."""
    idx = np.asarray(idx, int)
    if rows is None:
        return idx, np.arange(len(idx))
    blocks = np.unique(idx // rows)
    take = np.concatenate([np.minimum(np.arange(b * rows, (b + 1) * rows), n - 1) for b in blocks])
    return take, np.searchsorted(blocks, idx // rows) * rows + idx % rows


def _take_rows(tree, idx, sharding=None):
    """Rows ``idx`` of every batched array of ``tree``, placed on ``sharding`` (``None``: on one
    device, gathered there when the batch is sharded, as the retries and the probes want it)."""
    def one(x):
        if not eqx.is_array(x):
            return x
        if isinstance(x, jax.Array) and len(x.sharding.device_set) == 1:
            part = x[jnp.asarray(idx)]
        else:  # host data, or a sharded batch (gathered across processes under jax.distributed)
            part = jnp.asarray(to_host(x)[idx])
        return part if sharding is None else place(part, sharding)

    return jax.tree.map(one, tree)


def _batch_size(tree) -> int:
    return int([x for x in jax.tree.leaves(tree) if eqx.is_array(x)][0].shape[0])


def _block_size(rows: int | None, sharding) -> int | None:
    return None if rows is None else rows * (sharding.mesh.size if sharding is not None else 1)


def _calls(batched, rows: int | None, sharding=None, n: int | None = None) -> list[tuple[np.ndarray, Any]]:
    """``(idx, part)`` for each kernel call over the ``n`` rows of ``batched`` (default: its
    leading axis): the call's rows (:func:`row_blocks` of ``rows`` a device) and ``batched``
    restricted to them, placed on ``sharding``. A single call of every row unpadded is
    ``batched`` itself, with no copy."""
    n = _batch_size(batched) if n is None else n
    blocks = row_blocks(n, _block_size(rows, sharding))
    if len(blocks) == 1 and len(blocks[0]) == n:
        return [(blocks[0], batched)]
    return [(idx, _take_rows(batched, idx, sharding)) for idx in blocks]


def by_blocks(call, batched: tuple, rows: int | None):
    """``call(*batched)`` in blocks of ``rows`` rows a device (:func:`row_blocks`; ``None``: one
    call), all dispatched before any is gathered to the host; the blocks joined, padding dropped."""
    n = _batch_size(batched)
    outs = [call(*part) for _, part in _calls(batched, rows, _sharding_of(batched))]
    return jax.tree.map(lambda *x: np.concatenate(x)[:n], *[to_host(o) for o in outs])


def map_rows(f, batched: tuple, shared: tuple = (), mesh: jax.sharding.Mesh | None = None):
    """``f(*row, *shared)`` for every row of ``batched`` (leading axis B), one ``eqx.filter_vmap``.

    On a ``mesh`` (the configuration axis sharded over it) each device maps its own rows under
    ``shard_map``, so its program is the one a single device runs on that many rows, and no
    device waits for another. Left to GSPMD's partitioner, the vmapped solvers' while loops
    (whose predicate is an all-reduce over the configurations) synchronised the devices every
    iteration: the stiff stable flows of 4 configurations (an unseen tanh network on sklearn's
    diabetes data, RMSProp, 300 steps) took 82.7 s on 2 fake CPU devices, 23.5 s under
    ``shard_map`` and 49.7 s on one device. Both give the same numbers, which are 1e-16 off one
    device's (one configuration a solver step apart).

    Why a mesh of 2 or more devices rounds differently from one device (stop 41, traced on an
    unseen softplus network): the programs are compiled differently, not run differently. With
    more than one partition XLA's SPMD passes run before simplification and leave another graph
    (13 divides where the plain program keeps 6), and XLA on a CPU contracts a multiply and the
    add after it into one fused multiply-add wherever they share a fusion, so the rod's
    ``-(p - m) / (2 stretch) - r`` is rounded once in one program and twice in the other. Its
    inputs are equal to the bit; the edge's chaos grows the last-bit difference to 3e-10 in 100
    steps. So every mesh of 2 or more devices agrees bit for bit with every other (1 process x 4
    devices = 2 processes x 2 devices), and a one-device mesh (either device) with the plain run,
    but not the one with the other. No XLA flag turns the contraction off. So on a CPU mesh the
    kernels run the plain one-device program on each device instead (:func:`each_device_on_cpu`):
    bit-exact, at one compilation per local device (a 4-device sweep in one process: 144 s against
    74 s under ``shard_map``; nothing extra with one device per process). An accelerator mesh
    keeps this ``shard_map``."""
    g = eqx.filter_vmap(lambda b, s: f(*b, *s), in_axes=(eqx.if_array(0), None))  # a schedule leaf: shared
    if mesh is None:
        return g(batched, shared)
    arrays, static = eqx.partition(batched, eqx.is_array)
    shared_arrays, shared_static = eqx.partition(shared, eqx.is_array)
    out_static = []

    def local(a, sa):
        out_arrays, out_rest = eqx.partition(g(eqx.combine(a, static), eqx.combine(sa, shared_static)), eqx.is_array)
        out_static.append(out_rest)
        return out_arrays

    spec = jax.sharding.PartitionSpec
    out = jax.shard_map(local, mesh=mesh, in_specs=(spec("config"), spec()), out_specs=spec("config"),
                        check_vma=False)(arrays, shared_arrays)
    return eqx.combine(out, out_static[0])


def each_device_on_cpu(kernel):
    """``kernel(*args, mesh)`` (a jitted kernel whose last argument is the mesh its batch is
    sharded on), on a CPU mesh run as the plain one-device program (``mesh=None``) on each local
    device's own rows, every call dispatched before any is read, the outputs joined into global
    arrays on the same sharding.

    Why: a program compiled for a mesh of 2 or more devices rounds differently from the plain one
    (:func:`map_rows`), so a sweep on 2 processes x 2 fake CPU devices ended 1e-6 off the same
    sweep as one plain process (an unseen ELU network on sklearn's diabetes data, GD, 120 steps:
    rod solver steps 520 against 522). Run this way every layout equals the plain run bit for
    bit. The price is one compilation per local device, nothing with one device per process (a
    CPU cluster); an accelerator mesh keeps the single partitioned program, whose compile time
    does not grow with its devices."""

    @functools.wraps(kernel)
    def call(*args):
        mesh = args[-1] if args and isinstance(args[-1], jax.sharding.Mesh) else None
        if mesh is None or mesh.devices.flat[0].platform != "cpu":
            return kernel(*args)
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("config"))
        mine = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]

        def local(x, device):
            if not isinstance(x, jax.Array):
                return x
            if isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.spec and x.sharding.spec[0] == "config":
                return next(s.data for s in x.addressable_shards if s.device == device)  # this device's rows
            return jax.device_put(x, device)  # shared: a copy on this device

        outs = [kernel(*jax.tree.map(lambda x: local(x, d), args[:-1]), None) for d in mine]

        def join(*parts):
            if not isinstance(parts[0], jax.Array) or parts[0].ndim == 0:
                return parts[0]
            shape = (parts[0].shape[0] * mesh.size,) + parts[0].shape[1:]
            return jax.make_array_from_single_device_arrays(shape, sharding, list(parts))

        return jax.tree.map(join, *outs)

    return call


def _mesh_of(tree) -> jax.sharding.Mesh | None:
    sharding = _sharding_of(tree)
    return None if sharding is None else sharding.mesh


# --- rollout ------------------------------------------------------------------------------------
class Rollout(NamedTuple):
    loss: np.ndarray  # (B, N+1)
    half: np.ndarray  # (B, N)
    amplitude: np.ndarray  # (B, N)
    saved: Any  # (Phase, Slow) with leading axes (B, S)
    saved_steps: np.ndarray  # (S,)
    diverged_at: np.ndarray  # (B,) -1 where the run did not diverge


@each_device_on_cpu
@eqx.filter_jit
def _init_b(optimizer, loss_fn, params, mesh=None):
    return map_rows(lambda o, p: init_carry(o, loss_fn, p), (optimizer, params), (), mesh)


@each_device_on_cpu
@eqx.filter_jit
def _chunk_b(optimizer, loss_fn, carry, ks, num_steps, mask, mesh=None):
    return map_rows(lambda o, c, k, n, m: rollout_chunk(o, loss_fn, c, k, n, m), (optimizer, carry),
                    (ks, num_steps, mask), mesh)


def rollout_batch(optimizer, params, loss_fn, num_steps: int, save_steps=None, *, chunk_size: int = 64,
                  progress: bool = False, desc: str = "discrete", rows: int | None = None) -> Rollout:
    """The optimizer of every configuration for ``num_steps`` steps, states kept at ``save_steps``
    (default: every step), in calls of ``rows`` configurations a device (:func:`row_blocks`;
    ``None``: one call)."""
    total = num_steps + 1
    save_steps = np.arange(total) if save_steps is None else np.unique(np.asarray(save_steps, int))
    save_steps = save_steps[(save_steps >= 0) & (save_steps < total)]
    sharding = _sharding_of((optimizer, params))
    B = _batch_size((optimizer, params))
    mesh = None if sharding is None else sharding.mesh
    opts, carries = [], []
    for _, (o, p) in _calls((optimizer, params), rows, sharding):
        opts.append(o)
        carries.append(_init_b(o, loss_fn, p, mesh))
    n_chunks = -(-total // chunk_size)
    losses, halves, amps, kept = [], [], [], []
    n = jnp.asarray(num_steps)
    join = lambda parts: np.concatenate(parts)[:B]  # noqa: E731  (the blocks' rows, padding dropped)
    with bar(total, desc, "step", progress) as b:
        for c in range(n_chunks):
            steps = np.arange(c * chunk_size, (c + 1) * chunk_size)  # one shape: one compilation
            mask = np.isin(steps, save_steps)
            valid = steps < total
            idx = np.nonzero(mask & valid)[0]
            outs = []
            for j, o in enumerate(opts):  # every call dispatched before any is gathered
                carries[j], out = _chunk_b(o, loss_fn, carries[j], jnp.asarray(steps), n, jnp.asarray(mask), mesh)
                outs.append(out)
            # gathered under jax.distributed; across processes only the kept steps travel
            parts = [(to_host((out.loss, out.half, out.amplitude)), to_host(out.saved, take=idx)) for out in outs]
            (loss, half, amp), saved = jax.tree.map(lambda *x: join(x), *parts)
            losses.append(loss[:, valid])
            halves.append(half[:, valid])
            amps.append(amp[:, valid])
            kept.append(saved)
            b.update(int(valid.sum()))
    saved = jax.tree.map(lambda *x: np.concatenate(x, axis=1), *kept)
    diverged_at = join([to_host(c.diverged_at) for c in carries])
    return Rollout(np.concatenate(losses, 1), np.concatenate(halves, 1)[:, :num_steps],
                   np.concatenate(amps, 1)[:, :num_steps], saved, save_steps, diverged_at)


# --- solve --------------------------------------------------------------------------------------
class FlowArrays(NamedTuple):
    loss: np.ndarray  # (B, T) predicted loss at ts
    half_norm: np.ndarray  # (B, T)
    centre: Any  # (B, m, ...) centre params at param_ts
    slow: Any
    variance: np.ndarray  # (B, m)
    result: np.ndarray  # (B,)
    num_steps: np.ndarray  # (B,)
    num_rejected_steps: np.ndarray  # (B,)
    solver: np.ndarray | None = None  # (B,) the solver that produced each row (a name), when known
    construction: np.ndarray | None = None  # (B,) the flow that ran (``"rod2"``, ...): what ``"rod"`` resolved to
    note: np.ndarray | None = None  # (B,) why a row was held fixed from some step ("" for none)


@each_device_on_cpu
@eqx.filter_jit
def _solve_b(kind, optimizer, loss_fn, states, ts, param_ts, stop_at, start, options, config, progress, mesh=None):
    def one(opt, st, stop, t0, ts_, pts_):
        flow, y0 = flow_kind(kind).start(opt, loss_fn, *st, **options)
        cfg = config if config is not None else default_solver(flow, ts_.dtype)
        # a row that starts later than the batch (its own start step): its saves before then
        # repeat its start (blanked by solve_batch); the solve itself runs from t0
        return solve(flow, y0, jnp.maximum(ts_, t0), jnp.maximum(pts_, t0), cfg, stop_at=stop, progress=progress)

    return map_rows(one, (optimizer, states, stop_at, start), (ts, param_ts), mesh)


def solve_batch(kind: str, optimizer, loss_fn, states, ts, param_ts, stop_at, *, options=None,
                config: SolverConfig | None = None, progress: bool = False, rows: int | None = None,
                starts=None) -> FlowArrays:
    """The ``kind`` flow of every configuration from its ``states = (z0, s0, z1, s1)`` (stacked),
    over ``ts`` (integer steps), stopped at ``stop_at`` (B,) (``inf``: never), in calls of ``rows``
    configurations a device (:func:`row_blocks`; ``None``: one call), retries included.

    ``starts`` (B,): each row's own start step (``None``: ``ts[0]`` for all), at or after
    ``ts[0]``; a row's saves before its start are NaN (it had not started). The rows stay in
    one call, each at its place.

    With the default solver, a configuration whose flow runs out of its step budget is solved
    again: by the kind's :attr:`~rodflow_jax.flows.FlowKind.fallback` where it has one (a
    second-order rod outside the range its correction is valid in, :func:`_fall_back`), else by
    the matrix-free implicit solver (:func:`_retry_budget_hits`)."""
    kind = resolve(kind, optimizer)  # "rod": the construction this batch runs, decided on concrete values
    starts = np.full(len(np.asarray(stop_at)), np.asarray(ts)[0]) if starts is None else np.asarray(starts)
    arrays = _solve_rows(kind, optimizer, loss_fn, states, ts, param_ts, stop_at, starts, options, config, progress,
                         rows)
    fallback = flow_kind(kind).fallback
    if config is None and fallback is not None:
        arrays = _fall_back(kind, fallback, arrays, optimizer, loss_fn, states, ts, param_ts, stop_at, starts, options,
                            progress, rows)
    return _outside_blank(arrays, ts, param_ts, starts, stop_at)


def _outside_blank(arrays: FlowArrays, ts, param_ts, starts, stop_at) -> FlowArrays:
    """``arrays`` with each row's saves before its start step and after its stop NaN: it had not
    started, or had been stopped (diffrax fills the saves a stopped solve never reached with
    ``inf``, which read as a flow that blew up); so are the ``inf`` saves of a row whose solve
    failed (stalled, or out of its budget) before reaching them."""
    stop = np.asarray(stop_at, float)[:, None]
    failed = (np.asarray(arrays.result) != int(diffrax.RESULTS.successful._value))[:, None]

    def outside(t):
        t = np.asarray(t)[None, :]
        return (t < starts[:, None]) | (t > stop)

    before, pbefore = outside(ts), outside(param_ts)
    if not before.any() and not pbefore.any() and not failed.any():
        return arrays

    def blank(x, mask):  # (B, T, ...) over (B, T); integer leaves (a step count) are left as they are
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            return x
        x = x.copy()
        x[mask] = np.nan
        unreached = failed.reshape(failed.shape + (1,) * (x.ndim - 2)) & np.isinf(x)
        x[unreached] = np.nan
        return x

    return arrays._replace(loss=blank(arrays.loss, before), half_norm=blank(arrays.half_norm, before),
                           centre=jax.tree.map(lambda x: blank(x, pbefore), arrays.centre),
                           slow=jax.tree.map(lambda x: blank(x, pbefore), arrays.slow),
                           variance=blank(arrays.variance, pbefore))


def _fall_back(kind, fallback, arrays, optimizer, loss_fn, states, ts, param_ts, stop_at, starts, options, progress,
               rows):
    """``arrays`` with the rows whose ``kind`` solve ran out of its step budget replaced by
    ``fallback``'s solve (with the options it takes), each such row saying so in its note and
    naming ``fallback`` as its construction.

    Measured where this happens: a second-order rod started inside a transient far above the
    threshold (a softplus network at GD 0.5 from step 0, whose first steps catapult the loss from
    0.7 to 65). Its correction ``-Dv[v]/2`` is a series in ``eta lambda`` that stops converging at
    1 and turns into a stiff term of size ``(eta lambda)^2/2`` there: Tsit5 spent its whole budget
    (3,856 solver steps) without reaching step 1, and the implicit retry spent over 15 minutes to
    fail as well, where the first-order rod took 92 solver steps. (The second-order rods' budget is
    paced since, :class:`~rodflow_jax._integrate.PacedBudget`, so such a stall ends within 16
    steps' worth of it.)"""
    idx = np.nonzero(np.asarray(arrays.result) == _BUDGET_HIT)[0]
    if not len(idx):
        return arrays
    take, pos = aligned_rows(idx, len(arrays.result), rows)
    sub = solve_batch(fallback, _take_rows(optimizer, take), loss_fn, _take_rows(states, take), ts, param_ts,
                      np.asarray(stop_at)[take], options=flow_kind(fallback).own_options(options), progress=progress,
                      rows=rows, starts=starts[take])
    sub = FlowArrays(*(jax.tree.map(lambda x: np.asarray(x)[pos], part) for part in sub))
    steps = np.asarray(ts)
    # the first step it did not reach (a solve that stalls at once saves not even its start: step K + 1)
    done = [max(int(steps[np.argmin(np.isfinite(row))]), int(steps[0]) + 1) if not np.isfinite(row).all()
            else int(steps[-1]) for row in np.asarray(arrays.loss)[idx]]

    put = functools.partial(_put_rows, idx=idx)
    out = FlowArrays(*(jax.tree.map(put, a, b) for a, b in zip(arrays[:8], sub[:8])),
                     solver=put(arrays.solver, sub.solver), construction=put(arrays.construction, sub.construction),
                     note=put(arrays.note, [f"{kind} ran out of its step budget ({int(n)} solver steps) before step {d}; "
                                            f"these are {fallback}'s results" + (f" ({m})" if m else "")
                                            for n, d, m in zip(np.asarray(arrays.num_steps)[idx], done, sub.note)]))
    return out


def _put_rows(full, part, idx):
    """A copy of ``full`` with its rows ``idx`` replaced by ``part``."""
    full = np.array(full, copy=True)
    full[idx] = part
    return full


def _solve_rows(kind, optimizer, loss_fn, states, ts, param_ts, stop_at, starts, options, config, progress,
                rows) -> FlowArrays:
    """:func:`solve_batch` without the fallback: one batched solve, budget hits retried implicitly."""
    dtype = jax.tree.leaves(states[0])[0].dtype
    n, m = len(ts), len(param_ts)
    # save times padded (repeating the end) to a bucket of sizes, so runs of nearby lengths share
    # one compilation; the padding is sliced off again
    ts_p, pts_p = _pad(np.asarray(ts), _bucket(n)), _pad(np.asarray(param_ts), _bucket(m))
    states, stop, start = placed_like((states, np.asarray(stop_at, dtype), np.asarray(starts, dtype)), optimizer)
    ts_j, pts_j = jnp.asarray(ts_p, dtype), jnp.asarray(pts_p, dtype)
    sol = by_blocks(lambda o, st, sp, s0: tuple(_solve_b(kind, o, loss_fn, st, ts_j, pts_j, sp, s0, dict(options or {}),
                                                         config, progress, _mesh_of(o))),
                    (optimizer, states, stop, start), rows)
    shape = _flow_shape(kind, optimizer, loss_fn, states, dict(options or {}))
    if config is None:
        sol, names = _retry_budget_hits(kind, shape, optimizer, loss_fn, states, stop, start, ts_p, pts_p,
                                        dict(options or {}), sol, dtype, progress, rows)
    else:
        names = np.full(len(sol[5]), solver_name(config), dtype=object)
    # every row was solved (or retried) at the tolerance of this config: the hold rule's scale
    sol, notes = hold_converged(sol, ts_p, pts_p, (config or default_solver(shape, dtype)).rtol)
    loss, half, centre, slow, var = sol[:5]
    trim = lambda x, k: x[:, :k]  # noqa: E731
    construction = np.full(len(names), shape.construction, dtype=object)
    return FlowArrays(trim(loss, n), trim(half, n), jax.tree.map(lambda x: trim(x, m), centre),
                      jax.tree.map(lambda x: trim(x, m), slow), trim(var, m), *sol[5:], names, construction, notes)


_STALLED = {int(diffrax.RESULTS.max_steps_reached._value), int(diffrax.RESULTS.dt_min_reached._value)}
HOLD_WINDOW = 50  # steps


def hold_converged(sol, ts, param_ts, rtol: float):
    """Rows whose solve stalled (budget or step-size floor) *after their centre had converged*
    are held fixed from the last solved step, and say so; the rest are returned unchanged.

    Converged: over the last ``HOLD_WINDOW`` solved steps (at least 20, two saved centres) the
    centre moved less than ``10 rtol`` of its norm, ``rtol`` being the relative tolerance the rows
    were solved at (a stiff stable flow's 1e-6 in float64: 1e-5), i.e. it was stationary to within
    what the solver resolves. Measured
    where this happens (README, "Stiff stable flows"): the stable flow of an Adam-type optimizer
    sits at a minimum (|grad| ~1e-10) while ``sqrt(nu)`` decays to ``eps``, and the
    preconditioned field ``m / (sqrt(nu) + eps)`` turns sign-like: it chatters, every implicit
    step is rejected and the budget runs out. The flow's solution there (Filippov's, at a strict
    minimum) keeps the centre where it is, so the centre, its loss and the slow state are held;
    the record is not ``failed`` and its ``message`` says from which step it was held.
    """
    loss, result = np.asarray(sol[0]), np.asarray(sol[5])
    notes = np.full(len(result), "", dtype=object)
    if not np.isin(result, list(_STALLED)).any():
        return sol, notes  # the usual case: no copy of the centres
    ts, param_ts = np.asarray(ts), np.asarray(param_ts)
    tol = 10 * rtol
    rows = _rows(sol[2])  # (B, m, d) centres at param_ts
    held = []
    for b in np.nonzero(np.isin(result, list(_STALLED)))[0]:
        fin = np.isfinite(loss[b])
        if not fin.any() or fin.all():
            continue
        j = int(np.argmin(fin)) - 1  # the last solved step's index in ts
        if j < 0:
            continue
        t_end = ts[j]
        ok = (param_ts <= t_end) & np.isfinite(rows[b]).all(axis=1)
        window = ok & (param_ts >= t_end - HOLD_WINDOW)
        if window.sum() < 2 or np.ptp(param_ts[window]) < 20:
            continue
        last = rows[b][np.nonzero(ok)[0][-1]]
        size = np.linalg.norm(last)
        moved = np.max(np.linalg.norm(rows[b][window] - last, axis=1))
        if size > 0 and moved < tol * size:
            held.append((b, j, np.nonzero(ok)[0][-1]))
            notes[b] = (f"held fixed from step {int(t_end)}: the solver stalled there after the flow had converged "
                        f"(its centre moved {moved / size:.0e} of its norm over the last {HOLD_WINDOW} steps)")
    if not held:
        return sol, notes
    sol = [jax.tree.map(lambda x: np.array(x, copy=True), part) for part in sol]
    for b, j, q in held:
        sol[0][b, j + 1:] = sol[0][b, j]
        sol[1][b, j + 1:] = sol[1][b, j]
        for part in (2, 3):
            for leaf in jax.tree.leaves(sol[part]):
                leaf[b, q + 1:] = leaf[b, q]
        sol[4][b, q + 1:] = sol[4][b, q]
        sol[5][b] = int(diffrax.RESULTS.successful._value)
    return tuple(sol), notes


def _rows(tree) -> np.ndarray:
    """A pytree with leading axes (B, m) -> (B, m, n), leaves in ``ravel_pytree`` order."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return np.concatenate([x.reshape(x.shape[0], x.shape[1], -1) for x in leaves], axis=2)


def _flow_shape(kind, optimizer, loss_fn, states, options):
    """The flow one configuration of the batch starts (shapes only: nothing is computed)."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype) if eqx.is_array(x) else x,
                          (optimizer, states))
    return eqx.filter_eval_shape(lambda o, st: flow_kind(kind).start(o, loss_fn, *st, **options)[0], *shapes)


_BUDGET_HIT = int(diffrax.RESULTS.max_steps_reached._value)


def _retry_budget_hits(kind, shape, optimizer, loss_fn, states, stop, start, ts, param_ts, options, sol, dtype,
                       progress, rows):
    """The configurations whose default *explicit* solve ran out of its step budget, solved again
    with the matrix-free implicit solver (:func:`~rodflow_jax._integrate.implicit_retry`), their rows
    replaced: the rest keep the explicit solution. Returns the rows and each row's solver name.

    The retry is host-side, on the calls that hold failed rows (gathered to one device when the
    batch is sharded, as the probes are); it compiles one more solve per batch size that needs it."""
    first = default_solver(shape, dtype)
    names = np.full(len(sol[5]), solver_name(first), dtype=object)
    hit = np.asarray(sol[5]) == _BUDGET_HIT
    if is_implicit(first) or not hit.any() or flow_kind(kind).fallback is not None:
        return sol, names  # (a kind with a fallback is solved again by that: solve_batch)
    idx = np.nonzero(hit)[0]
    cfg = implicit_retry(first, dtype)
    ts_j, pts_j = jnp.asarray(ts, dtype), jnp.asarray(param_ts, dtype)
    take, pos = aligned_rows(idx, len(hit), rows)  # each row at its place in its call
    redo = by_blocks(lambda o, st, sp, s0: tuple(_solve_b(kind, o, loss_fn, st, ts_j, pts_j, sp, s0, options, cfg,
                                                          progress)),
                     _take_rows((optimizer, states, stop, start), take), rows)
    redo = jax.tree.map(lambda x: x[pos], redo)
    put = functools.partial(_put_rows, idx=idx)
    sol = tuple(jax.tree.map(put, a, b) for a, b in zip(sol, redo))
    names[idx] = f"{solver_name(cfg)} (retried: {solver_name(first)} ran out of its step budget)"
    return sol, names


def _bucket(n: int) -> int:
    """The next of 16, 32, 64, ... (and multiples of 512 past that) at or above ``n``."""
    if n <= 512:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 512) * 512


def _pad(x: np.ndarray, size: int) -> np.ndarray:
    return np.concatenate([x, np.full(size - len(x), x[-1], x.dtype)]) if len(x) else x


# --- probes -------------------------------------------------------------------------------------
class ProbeArrays(NamedTuple):
    eigenvalues: np.ndarray  # (B, m, k)
    threshold: np.ndarray  # (B, m)
    hvps: np.ndarray  # (B, m)


@eqx.filter_jit
def _probe_b(optimizer, loss_fn, params, slow, v, k, method, max_iter, tol):
    def one(o, p, s, v0):
        return probe_trajectory(o, loss_fn, p, s, v0, k=k, method=method, max_iter=max_iter, tol=tol)

    return eqx.filter_vmap(one)(optimizer, params, slow, v)


def probe_batch(optimizer, loss_fn, params, slow, *, k: int = 1, method: str = "lanczos", max_iter: int = 40,
                tol: float = 1e-3, chunk: int = 8, progress: bool = False, desc: str = "sharpness",
                rows: int | None = None) -> ProbeArrays:
    """Probes at the stacked states ``params``/``slow`` (leading axes (B, m)), warm-started along m,
    in calls of ``rows`` configurations (:func:`row_blocks`; ``None``: one call).

    A batch sharded over several devices is probed on one device: the partitioned probe kernel
    stalled XLA's CPU backend (2 fake CPU devices, jax 0.10.2), where the rollout and the solve
    run partitioned fine. Probes are a small share of a sweep's time (README). Under
    ``jax.distributed`` every process gathers the optimizer and probes the whole batch on its own
    first device (the states arrive gathered already), so all processes hold the same probes."""
    if _sharding_of(optimizer) is not None:
        dev = jax.local_devices()[0]
        optimizer = jax.tree.map(
            lambda x: jax.device_put(x if x.is_fully_addressable else to_host(x), dev) if isinstance(x, jax.Array)
            else x, optimizer)
    leaves = jax.tree.leaves(params)
    B, m = leaves[0].shape[:2]
    if m == 0:
        return ProbeArrays(np.zeros((B, 0, k)), np.zeros((B, 0)), np.zeros((B, 0), int))
    first = jax.tree.map(lambda x: x[0, 0], params)
    flat = ravel_pytree(first)[0]
    # one start vector for every configuration: a draw per batch position would give a shard's
    # configurations other vectors than the whole sweep gives them (test_shard.py)
    v0 = jax.random.normal(jax.random.PRNGKey(0), flat.shape, flat.dtype)
    pad = -m % chunk
    padded = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[:, -1:], pad, axis=1)], 1) if pad else x,
                          (params, slow))
    calls = _calls(optimizer, rows, n=B)
    out_blocks = []
    with bar(m * len(calls), desc, "probe", progress) as b:
        for idx, o in calls:
            v = jnp.broadcast_to(v0, (len(idx),) + flat.shape)
            ev, thr, hv = [], [], []
            for c in range(0, m, chunk):
                p, s = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[idx, c:c + chunk]), padded)
                out = _probe_b(o, loss_fn, p, s, v, k, method, max_iter, tol)
                v = out.vector
                ev.append(np.asarray(out.eigenvalues))
                thr.append(np.asarray(out.threshold))
                hv.append(np.asarray(out.hvps))
                b.update(min(chunk, m - c))
            out_blocks.append(tuple(np.concatenate(x, 1)[:, :m] for x in (ev, thr, hv)))
    ev, thr, hv = (np.concatenate(x)[:B] for x in zip(*out_blocks))
    return ProbeArrays(ev, thr, hv)
