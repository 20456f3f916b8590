"""One evaluation: discrete run, flows from step K, probes, and the comparison, for a batch.

``compare`` is a batch of one; ``sweep`` a batch of every configuration. The pieces are the
kernels of :mod:`._engine`; this module only decides the grids and lines the arrays up:

* the *grid*: the steps k whose midpoints ``(z_k + z_{k+1})/2`` are compared (every step unless
  ``B * n * N`` exceeds ``param_budget`` floats, then every ``every`` steps);
* the *probe steps*: the grid steps that are multiples of ``probe_every`` (default ``N // 50``);
* the flows run over ``K .. N - 1`` (the last midpoint), each stopped where its configuration's
  discrete run diverged.

The discrete half (the rollout on the grid and its probes, :func:`discrete_evaluation`) does not
depend on K, so evaluations of one run from several start steps may share it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import _metrics as M
from .._discrete import DiscreteRun
from .._errors import InputError
from .._integrate import result_message
from .._resources import relieve_map_pressure
from .._sharpness import DENSE_MAX_PARAMS
from ..flows import flow_kind
from ..flows._registry import resolve
from ..flows._central import check_central_options
from ..flows._rod import period_two_endpoints, period_two_order, period_two_trusted
from ._engine import FlowArrays, ProbeArrays, Rollout, _rows, probe_batch, rollout_batch, solve_batch
from ._progress import say


@dataclasses.dataclass
class FlowResult:
    arrays: FlowArrays
    probes: ProbeArrays
    probe_steps: np.ndarray
    param_error: np.ndarray  # (B, Gf)

    def message(self, i: int) -> str:
        code = int(self.arrays.result[i])
        return result_message(code, self.arrays.loss.dtype) if code else ""


@dataclasses.dataclass
class DiscreteEvaluation:
    """The discrete half of an evaluation: one rollout and its probes on the comparison grid.

    Evaluations of the same run from several start steps share it (``evaluate(...,
    discrete=...)``; ``compare(..., reuse=...)``): the flows differ, the optimizer's run does not.
    """

    num_steps: int
    num_params: int
    every: int
    grid: np.ndarray  # (G,) midpoint steps
    probe_steps: np.ndarray  # (P,)
    settings: tuple  # (top_k, probe method): the probes' own settings
    rollout: Rollout
    probes: ProbeArrays
    timings: dict[str, float]

    def covers(self, start_step: int) -> bool:
        """Whether the states a flow from ``start_step`` starts from (its period-two window) were kept."""
        need = np.arange(start_step, start_step + period_two_order(self.num_steps - start_step) + 1)
        return bool(np.isin(need, self.rollout.saved_steps).all())

    def run(self, i: int = 0) -> DiscreteRun:
        """Configuration ``i``'s run as a :class:`~rodflow_jax.DiscreteRun` (its saved states)."""
        return DiscreteRun.of(self.rollout, i)


@dataclasses.dataclass
class Evaluation:
    """The flows from ``start_step`` and the discrete half they were compared with (whose run,
    grid and probes the properties below read)."""

    start_step: int  # the batch's first start step: where the flows' arrays begin
    threshold_quantity: str
    discrete: DiscreteEvaluation
    flows: dict[str, FlowResult]
    timings: dict[str, float]
    starts: np.ndarray  # (B,) each configuration's own start step (>= start_step: after_transient)

    num_steps = property(lambda self: self.discrete.num_steps)
    num_params = property(lambda self: self.discrete.num_params)
    every = property(lambda self: self.discrete.every)
    grid = property(lambda self: self.discrete.grid, doc="(G,) midpoint steps")
    probe_steps = property(lambda self: self.discrete.probe_steps, doc="(P,)")
    probes = property(lambda self: self.discrete.probes, doc="the discrete run's probes")
    loss = property(lambda self: self.discrete.rollout.loss, doc="(B, N+1)")
    half = property(lambda self: self.discrete.rollout.half, doc="(B, N)")
    amplitude = property(lambda self: self.discrete.rollout.amplitude, doc="(B, N)")
    diverged_at = property(lambda self: self.discrete.rollout.diverged_at, doc="(B,)")

    @functools.cached_property
    def avg_loss(self) -> np.ndarray:
        """(B, N): the discrete ``(L_k + L_{k+1}) / 2`` (computed once: every record reads it)."""
        return 0.5 * (self.loss[:, :-1] + self.loss[:, 1:])

    @property
    def flow_steps(self) -> np.ndarray:
        return np.arange(self.start_step, self.num_steps)

    @property
    def flow_grid(self) -> np.ndarray:
        return self.grid[self.grid >= self.start_step]

    def ratio(self, i: int) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.probes.eigenvalues[i][:, 0] / self.probes.threshold[i]

    def started(self, i: int) -> bool:
        """Whether configuration ``i``'s flows started (:func:`flows_start`)."""
        return bool(flows_start(self.diverged_at[i], self.starts[i]))

    def onset(self, i: int) -> int | None:
        return M.eos_onset_step(self.probe_steps, self.ratio(i))

    def predicts_variance(self, name: str) -> bool:
        return flow_kind(name).predicts_variance


def flows_start(diverged_at, start_step: int):
    """Which configurations' flows start: those whose discrete run did not diverge by step
    ``K + 1`` (the flows need ``z_K`` and ``z_{K+1}``). The one rule for every batch, so that a
    configuration gets the same record and arrays alone, in a shard or in the whole sweep."""
    diverged_at = np.asarray(diverged_at)
    return (diverged_at < 0) | (diverged_at > start_step + 1)


def grids(num_params: int, num_steps: int, batch: int, probe_every: int | None, param_budget: float):
    every = max(1, math.ceil(batch * num_params * (num_steps + 1) / param_budget))
    grid = np.arange(0, num_steps, every)
    pe = probe_every or max(1, num_steps // 50)
    pe = every * max(1, round(pe / every))  # probes on the grid
    return every, grid, grid[grid % pe == 0]


def _period_two_states(states, window):
    """``states = (z_K, s_K, z_{K+1}, s_{K+1})`` (stacked) with the phases replaced by
    :func:`~rodflow_jax.flows._rod.period_two_endpoints` of ``window``; a configuration whose
    window is not finite (it diverged within it) or is not a period-2 part
    (:func:`~rodflow_jax.flows._rod.period_two_trusted`: a transient) keeps its two iterates."""
    z0, s0, z1, s1 = states
    p0, p1 = period_two_endpoints(window)
    leaves = jax.tree.leaves(p0)
    ok = np.all([np.isfinite(np.asarray(x)).reshape(x.shape[0], -1).all(axis=1) for x in leaves], axis=0)
    ok &= np.asarray(jax.vmap(lambda *w: period_two_trusted(w))(*window))
    pick = lambda a, b: jax.tree.map(  # noqa: E731
        lambda x, y: np.where(ok.reshape((-1,) + (1,) * (np.ndim(x) - 1)), np.asarray(x), np.asarray(y)), a, b)
    return pick(p0, z0), s0, pick(p1, z1), s1


def _num_params(params) -> int:
    return sum(int(np.prod(x.shape[1:])) for x in jax.tree.leaves(params))


def check_options(num_params: int, num_steps: int, models, flow_options: dict | None, probe_every: int | None,
                  top_k: int) -> None:
    """The probes' and the central flow's settings against the problem's size, before any run:
    ``top_k`` eigenvalues of a ``num_params``-dimensional Hessian, one probe every ``probe_every``
    of ``num_steps`` steps."""
    if not 1 <= top_k <= num_params:
        raise InputError(f"top-k must lie in 1..{num_params} (the model has {num_params} parameters), got {top_k}")
    if probe_every is not None and not 1 <= probe_every <= num_steps:
        raise InputError(f"probe-every must lie in 1..{num_steps} (the number of steps), got {probe_every}")
    if "central" in models:
        check_central_options(num_params, **(flow_options or {}).get("central", {}))


def _probe_method(num_params: int, sharpness_method: str) -> str:
    if sharpness_method != "auto":
        return sharpness_method
    return "dense" if num_params <= DENSE_MAX_PARAMS else "lanczos"


def discrete_evaluation(loss_fn, optimizer, params, num_steps: int, starts=(), *, probe_every: int | None = None,
                        top_k: int = 1, sharpness_method: str = "auto", param_budget: float = 2e7, progress=False,
                        batch: int | None = None, rows: int | None = None,
                        probes: ProbeArrays | None = None) -> DiscreteEvaluation:
    """The optimizer's run over the comparison grid (each grid step and the next kept), the
    period-two windows of the flows' start steps ``starts`` kept too, and the probes at the grid's
    probe steps; every kernel in calls of ``rows`` configurations a device (``None``: one call).
    ``probes``: this run's probes, made before (the run is redone only to keep more states)."""
    N = num_steps
    B = batch or int(jax.tree.leaves(params)[0].shape[0])
    n = _num_params(params)
    method = _probe_method(n, sharpness_method)
    every, grid, probe_steps = grids(n, N, B, probe_every, param_budget)
    windows = [np.arange(K, K + period_two_order(N - K) + 1) for K in starts]
    save = np.unique(np.concatenate([grid, grid + 1, *windows]))
    timings: dict[str, float] = {}
    t = time.perf_counter()
    r = rollout_batch(optimizer, params, loss_fn, N, save, progress=progress, rows=rows,
                      desc="discrete" if B == 1 else f"discrete ({B} configurations)")
    timings["discrete"] = time.perf_counter() - t
    pos = {int(s): j for j, s in enumerate(r.saved_steps)}
    phase, slow = r.saved
    idx = [pos[int(k)] for k in probe_steps]
    if probes is None:
        t = time.perf_counter()
        probes = probe_batch(optimizer, loss_fn, *jax.tree.map(lambda x: x[:, idx], (phase.params, slow)), k=top_k,
                             method=method, progress=progress, desc="discrete", rows=rows)
        timings["discrete probes"] = time.perf_counter() - t
    probes = _after_divergence_nan(probes, probe_steps, r.diverged_at)
    return DiscreteEvaluation(N, n, every, grid, probe_steps, (top_k, method), r, probes, timings)


def _after_divergence_nan(probes: ProbeArrays, probe_steps, diverged_at) -> ProbeArrays:
    """``probes`` with NaN sharpness and threshold at the probe steps from each row's divergence
    on: a diverged run's state is frozen at its first non-finite or exploded step, and probing it
    again measured nothing real (a 6-parameter network diverged at step 4 reported a final
    sharpness of 1.9e7, 2.4e6 x its threshold, and an edge crossing after the divergence)."""
    dead = (np.asarray(diverged_at)[:, None] >= 0) & (np.asarray(probe_steps)[None, :] >= np.asarray(diverged_at)[:, None])
    if not dead.any():
        return probes
    eig = np.where(dead[..., None], np.nan, np.asarray(probes.eigenvalues))
    return probes._replace(eigenvalues=eig, threshold=np.where(dead, np.nan, np.asarray(probes.threshold)))


def evaluate(loss_fn, optimizer, params, num_steps: int, start_step: int, models, *, threshold_quantity: str,
             flow_options: dict | None = None, solver: dict | None = None, probe_every: int | None = None,
             top_k: int = 1, sharpness_method: str = "auto", param_budget: float = 2e7, progress=False,
             batch: int | None = None, discrete: DiscreteEvaluation | None = None,
             rows: int | None = None, after_transient: bool = False) -> Evaluation:
    """Every model of ``models`` on the batch (``optimizer`` and ``params`` stacked, B configurations),
    each kernel in calls of ``rows`` configurations a device (:func:`~._engine.row_blocks`; ``None``:
    one call of the whole batch).

    The flows start at ``start_step``; with ``after_transient``, a configuration whose run starts
    far past its edge starts its flows where that initial transient ends instead
    (:func:`transient_starts`), each row at its own step in the same calls.

    ``discrete``: the same run's :func:`discrete_evaluation` (the same loss, optimizer, initial
    parameters and settings: the caller's promise), reused where it kept the states the flows start
    from; otherwise the run is made afresh. A reused run's time is not in this evaluation's
    ``timings``."""
    relieve_map_pressure()  # before this call's compilations, not in the middle of them
    K, N = start_step, num_steps
    check_options(_num_params(params), N, models, flow_options, probe_every, top_k)
    B = batch or int(jax.tree.leaves(params)[0].shape[0])
    settings = dict(probe_every=probe_every, top_k=top_k, sharpness_method=sharpness_method,
                    param_budget=param_budget, progress=progress, batch=B, rows=rows)
    timings: dict[str, float] = {}
    if discrete is not None:
        n = _num_params(params)
        every, grid, probe_steps = grids(n, N, B, probe_every, param_budget)
        same = (discrete.num_steps == N and discrete.every == every and np.array_equal(discrete.probe_steps, probe_steps)
                and discrete.settings == (top_k, _probe_method(n, sharpness_method)))
        if not same:
            raise ValueError("evaluate: the discrete run passed was made with other steps or probe settings")
    if discrete is None or not discrete.covers(K):
        discrete = discrete_evaluation(loss_fn, optimizer, params, N, (K,), **settings)
        timings.update(discrete.timings)
    begin = np.full(len(discrete.rollout.diverged_at), K)
    if after_transient:
        begin = transient_starts(discrete, K)
        later = sorted({int(k) for k in begin} - {K})
        if not all(discrete.covers(k) for k in later):
            # the run again (bit for bit the same), keeping the states these starts need; its probes stand
            t = time.perf_counter()
            discrete = discrete_evaluation(loss_fn, optimizer, params, N, (K, *later), **settings,
                                           probes=discrete.probes)
            timings["discrete (kept again for the later starts)"] = time.perf_counter() - t
    r, grid, probe_steps = discrete.rollout, discrete.grid, discrete.probe_steps
    pos = {int(s): j for j, s in enumerate(r.saved_steps)}
    phase, slow = r.saved
    P = _rows(phase.params)
    rows_ = np.arange(len(begin))
    at = lambda j: np.array([pos[int(k) + j] for k in begin])  # noqa: E731  (each row's step start + j)
    mid = 0.5 * (P[:, [pos[k] for k in grid]] + P[:, [pos[k + 1] for k in grid]])
    mid_K = 0.5 * (P[rows_, at(0)] + P[rows_, at(1)])
    diverged = r.diverged_at >= 0
    order = period_two_order(N - K)  # a rod's half-vector from z_K .. z_{K+order}
    method = discrete.settings[1]

    def probe(params_, slow_, desc):
        t = time.perf_counter()
        out = probe_batch(optimizer, loss_fn, params_, slow_, k=top_k, method=method, progress=progress, desc=desc,
                          rows=rows)
        timings[f"{desc} probes"] = time.perf_counter() - t
        return out

    avg = 0.5 * (r.loss[:, :-1] + r.loss[:, 1:])

    flows: dict[str, FlowResult] = {}
    fgrid = grid[grid >= K]
    if flows_start(r.diverged_at, begin).any():
        states = tuple(jax.tree.map(lambda x: x[rows_, at(j)], s) for j in (0, 1) for s in (phase, slow))
        rod_states = None  # built when the first model that starts from it needs it
        stop = np.where(diverged, np.maximum(r.diverged_at, begin) - 1.0, np.inf)
        for name in models:
            if name == "discrete":
                continue
            later_rows = int((begin > K).sum())
            span = (f"steps {int(begin.min())}..{N - 1}" if later_rows in (0, len(begin)) else
                    f"steps {K}..{N - 1} ({later_rows} from later steps, after their initial transients)")
            say(progress, f"{name} flow: {B} configuration(s), {span}")
            t = time.perf_counter()
            y0s = states
            if flow_kind(resolve(name, optimizer)).period_two_start:
                if rod_states is None:
                    rod_states = _period_two_states(states, [jax.tree.map(lambda x: x[rows_, at(j)], phase)
                                                             for j in range(order + 1)])
                y0s = rod_states
            fa = solve_batch(name, optimizer, loss_fn, y0s, np.arange(K, N), fgrid, stop,
                             options=(flow_options or {}).get(name), config=(solver or {}).get(name),
                             progress=B == 1 and progress is True, rows=rows, starts=begin)
            timings[name] = time.perf_counter() - t
            C = _rows(fa.centre)
            err = M.param_rel_error(C, mid[:, grid >= K], mid_K[:, None])
            err = np.where(np.isfinite(avg[:, fgrid]), err, np.nan)
            # the probe steps, and the flow's first saved step: a catapult under way when a flow
            # starts has a sharpness before it to drop from (catapults' sharpness rule)
            fidx = np.union1d([0], np.nonzero(np.isin(fgrid, probe_steps))[0])
            fprobes = probe(*jax.tree.map(lambda x: x[:, fidx], (fa.centre, fa.slow)), name)
            flows[name] = FlowResult(fa, fprobes, fgrid[fidx], err)
    return Evaluation(K, threshold_quantity, discrete, flows, timings, begin)


def batch_of_one(optimizer, params0):
    """``optimizer`` (its array hyperparameters in the parameters' dtype) and ``params0`` with a
    leading batch axis of 1: one run as the engine's kernels take it."""
    dtype = jnp.result_type(*jax.tree.leaves(params0))
    opt = jax.tree.map(lambda x: jnp.asarray(x, dtype)[None] if eqx.is_array_like(x) and not callable(x) else x,
                       optimizer)
    return opt, jax.tree.map(lambda x: jnp.asarray(x)[None], params0)


def auto_start(loss_fn, optimizer, params0, num_steps: int, start_step: int) -> int:
    """One run's ``"auto"`` start, as ``compare`` takes it at its default probe grid:
    ``start_step`` (the optimizer's default), or where the run's initial transient ends
    (:func:`transient_starts`). Costs one probe at step 0, and the run's discrete evaluation
    (its steps and probes) only where that probe finds it starting far past its edge."""
    opt, params = batch_of_one(optimizer, params0)
    slow0 = optimizer.init(params0)[1]
    first = probe_batch(opt, loss_fn, *jax.tree.map(lambda x: jnp.asarray(x)[None, None], (params0, slow0)),
                        method=_probe_method(_num_params(params), "auto"))
    if not first.eigenvalues[0, 0, 0] > M.TRANSIENT_LEVEL * first.threshold[0, 0]:
        return start_step
    disc = discrete_evaluation(loss_fn, opt, params, num_steps, (start_step,), batch=1)
    return int(transient_starts(disc, start_step)[0])


def transient_starts(discrete: DiscreteEvaluation, start_step: int) -> np.ndarray:
    """(B,) each configuration's start: ``start_step``, or, for a run that starts far past its
    edge (:func:`~rodflow_jax._metrics.after_initial_transient`: above 1.5x its threshold at step
    0), the first probed step at which it is back under the threshold, where that is later.

    Why: flows started inside such an initial transient start from a state the edge-of-stability
    dynamics have not reached. Measured on an unseen GELU 13-20-20-3 network (squared error on
    sklearn's wine data, GD 0.5, 800 steps, float64), which starts at 3.13x its threshold and
    catapults at 177 and 302: from step 0 the rod fired one catapult, at step 29, and its error
    was 1.24x below the stable flow's; from step 16, where the transient ends, it fired two, at
    173 and 288, and ended 46.7x closer.

    A start is moved only within the first quarter of the flows' steps (a run that stays above its
    threshold longer than that is at its edge, not in a transient: its start stays, and its
    record's ``start_note`` says where it comes back), and only where the period-two window of the
    batch's start still fits, so that every row keeps the same window order."""
    n = discrete.num_steps
    order = period_two_order(n - start_step)
    latest = start_step + (n - start_step) // 4
    ev, thr = discrete.probes.eigenvalues[:, :, 0], discrete.probes.threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = ev / thr
    out = np.full(len(ratio), start_step)
    for i, row in enumerate(ratio):
        end = M.after_initial_transient(discrete.probe_steps, row)
        if end is not None and start_step < end <= latest and period_two_order(n - end) == order:
            out[i] = end
    return out
