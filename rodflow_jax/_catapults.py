r"""Catapults as a measurement: loss spikes with a matching sharpness drop (pure numpy).

At the edge of stability the loss spikes while the instability along the sharpest direction
grows, and the spike throws the iterate to a flatter region: the sharpness drops below the
threshold, then rises again. A flow that fires its catapults early, or too often, accumulates
its error at each one, so the catapult train is measured directly.

**Spikes.** Let ``x_k = L_k - floor`` (``floor`` below; 0 for a positive loss). Scanning ``k``
upwards with a baseline ``b`` (the running minimum of ``x`` since the last spike ended):

- a spike *starts* at the first ``k`` with ``x_k > rise * b``; its trigger level is
  ``rise * b`` (the step reported is this crossing on the rising flank, not the trough before
  it, whose position on a flat valley is ill-defined);
- it *ends* at the first later ``k`` with ``x_k <= max(rise * b, p / rise)``, ``p`` its peak so
  far: the loss has fallen back by the factor ``rise`` from its peak (a hysteresis in
  ``log x``), or below the level that triggered it, whichever comes first, so that a catapult
  that leaves the loss on a higher plateau still ends; the baseline restarts there, ``b = x_k``;
- a spike that starts fewer than ``merge`` steps after the previous one *started* is the same
  spike (a catapult's rebounds and ring-down are one event): it keeps the first start.

Why from start to start (the issue's "spikes closer than 25 steps are one"): until stop 41 the
window was counted from the previous spike's *end*, which merged a periodic train of catapults
into one event whenever the loss stayed low for less than ``merge`` steps between them. On toy
heavy ball (momentum 0.5) the discrete run and its rod both catapult every 31-32 steps (each a
20x loss spike with an 18 % sharpness drop, over about 9 steps); from its end, the rod's first
spike never ended (46 to 498) and the discrete run's second ran from 79 to 494, so 14 catapults
each read as 1 and 2. Over the at-edge cells of toy, deep-linear and mlp-digits whose discrete
run catapults after the start, counting from the start gives the rod the same count in 11 of 18
(from the end: 5 of 16) and its first catapult on time in 18 of 18 (15 of 16;
``benchmarks/catapult_counts.py``).

A spike still open when the data run out is kept (a catapult at the end of the run). The loss is
cut at its first non-finite entry (a diverged tail), and a spike still open there is the
divergence itself, not a catapult: it is dropped.

**Negative losses.** The ratio rule needs ``x > 0``. A loss whose finite entries are all
positive is used as it is (``floor = 0``); otherwise (the ``toy`` problem's tilt makes its
loss negative near its minimum) ``floor = min L - 0.01 (max L - min L)``, so the lowest point
counts as 1 % of the run's range above the floor and a spike from there must rise by 0.5 % of
the range (at ``rise = 1.5``). Pass ``floor`` to compare runs on one scale: ``metrics.json``
measures a flow's spikes from the discrete run's floor (or the flow's own where it goes below
it; :func:`reference_floor`), since a flow's range from its start step is not the run's from
step 0.

**Sharpness drop.** With a sharpness trajectory (probed on any grid, NaN where not probed or
diverged), a spike starting at step ``s`` is kept only if

    min S[s, s + after]  <=  (1 - drop) * max S[s - before, s],

over the finite probes in those windows (a spike with no finite probe in either is dropped).
Each window is at least the probe spacing (the median step between probes): with probes every
30 steps (a 1,500-step ``compare``'s default) a 25-step window before the spike would hold no
probe for 4 spikes in 30 and drop them, the largest catapults included. Defaults ``drop = 0.05``,
``window = (before, after) = (25, 50)``: on mlp-digits (probes every
5 steps at the discrete midpoints) GD's catapult at step 342 drops the sharpness 18 % (12.4 to
10.2) and heavy ball's (momentum 0.9) catapults 9-14 %; the sharpness wanders by about 1 %
between probes on the edge-of-stability plateau.

**Matching.** :func:`match_catapults` pairs reference and model catapults by the optimal
order-preserving assignment: the most pairs within ``tolerance``, and among those the least
total ``|model - reference|``. For points on a line an optimal assignment can always be taken
without crossings (uncrossing two pairs never increases either cost), so this is also the
optimal (Hungarian) assignment; it is found by dynamic programming in ``O(n m)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

RISE = 1.5
MERGE = 25
DROP = 0.05
WINDOW = (25, 50)
FIRST_RELATIVE = 0.03  # "first catapult on time": within max(3 % of its step, 15 steps)
FIRST_ABSOLUTE = 15


def finite_prefix(loss) -> np.ndarray:
    """``loss`` up to (not including) its first non-finite entry."""
    loss = np.asarray(loss, float).ravel()
    bad = np.nonzero(~np.isfinite(loss))[0]
    return loss[: bad[0]] if bad.size else loss


def loss_floor(loss) -> float:
    """The level the ratio rule measures from: 0 for a positive loss, else ``min - 1 % range``."""
    x = finite_prefix(loss)
    if x.size == 0 or x.min() > 0:
        return 0.0
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo if hi > lo else max(abs(lo), 1.0)
    return lo - 0.01 * span


def reference_floor(reference_loss, model_loss) -> float:
    """The floor a model's spikes are measured from to be compared with a reference run's: the
    reference's (:func:`loss_floor`), or the model's own where the model goes below it. The ratio
    rule is not scale-free for a loss that goes negative: from a floor of its own, set by its
    range from a later start instead of the reference's whole run, a model's spikes would not be
    the events the reference's are."""
    floor = loss_floor(reference_loss)
    own = finite_prefix(model_loss)
    return floor if own.size == 0 or own.min() > floor else loss_floor(own)


def _spikes(x: np.ndarray, steps: np.ndarray, rise: float, merge: float,
            merge_from: str = "start") -> list[tuple[int, int | None]]:
    """``(start, end)`` indices of the spikes of a positive series ``x`` (end None: still open)."""
    since = 0 if merge_from == "start" else 1
    spikes: list[tuple[int, int | None]] = []
    base = np.inf
    level = peak = None  # trigger level and peak of the open spike; None when none is open
    for i, v in enumerate(x):
        if level is not None:
            peak = max(peak, v)
            if v <= max(level, peak / rise):
                spikes[-1] = (spikes[-1][0], i)
                level, base = None, v
            continue
        if v > rise * base:
            last = spikes[-1] if spikes else None
            if last is not None and steps[i] - steps[last[since]] < merge:
                spikes[-1] = (last[0], None)  # a rebound: the previous spike goes on
            else:
                spikes.append((i, None))
            level, peak = rise * base, v
        else:
            base = min(base, v)
    return spikes


def sharpness_drop(step, sharpness, sharpness_steps, window=WINDOW) -> float:
    """``1 - min S[step, step + after] / max S[step - before, step]`` over the finite probes
    (NaN where either window has none); ``before`` and ``after`` are at least the probe spacing."""
    s = np.asarray(sharpness, float).ravel()
    t = np.asarray(sharpness_steps, float).ravel()
    grid = np.unique(t)
    spacing = float(np.median(np.diff(grid))) if grid.size > 1 else 0.0
    before, after = (max(float(w), spacing) for w in window)
    pre = s[(t >= step - before) & (t <= step) & np.isfinite(s)]
    post = s[(t >= step) & (t <= step + after) & np.isfinite(s)]
    if pre.size == 0 or post.size == 0 or pre.max() == 0:
        return float("nan")
    return float(1.0 - post.min() / pre.max())


def detect_catapults(
    loss,
    steps=None,
    *,
    rise: float = RISE,
    merge: float = MERGE,
    sharpness=None,
    sharpness_steps=None,
    drop: float = DROP,
    window: tuple[float, float] = WINDOW,
    floor: float | None = None,
    merge_from: str = "start",
) -> np.ndarray:
    """The first step of each catapult in ``loss`` (see the module for the rule).

    ``loss`` is a 1-d series at ``steps`` (default ``0, 1, ...``); for a discrete run pass the
    period-2 average ``(L(z_k) + L(z_{k+1}))/2``, whose raw alternation would otherwise trigger.
    ``sharpness`` at ``sharpness_steps`` (default ``steps``) keeps only the spikes followed by
    a relative sharpness drop of at least ``drop`` (windows ``window = (before, after)`` steps).
    ``merge`` and ``window`` are in the units of ``steps``; ``merge_from="end"`` counts ``merge``
    from the previous spike's end, the rule before stop 41 (for comparisons). Returns the spikes' steps, ascending
    (an empty array if there are none, or no data).
    """
    if rise <= 1:
        raise ValueError(f"rise must exceed 1, got {rise}")
    if merge_from not in ("start", "end"):
        raise ValueError(f"merge_from must be 'start' or 'end', got {merge_from!r}")
    raw = np.asarray(loss, float).ravel()
    steps = np.arange(raw.size) if steps is None else np.asarray(steps).ravel()
    if steps.shape != raw.shape:
        raise ValueError(f"steps has {steps.size} entries, loss {raw.size}")
    x = finite_prefix(raw)
    if x.size == 0:
        return steps[:0].copy()
    x = x - (loss_floor(x) if floor is None else float(floor))
    diverged = x.size < raw.size
    found = [a for a, b in _spikes(x, steps, rise, merge, merge_from) if b is not None or not diverged]
    out = steps[np.asarray(found, int)]
    if sharpness is None:
        return out
    sharp_steps = steps if sharpness_steps is None else np.asarray(sharpness_steps).ravel()
    if np.size(sharpness) != sharp_steps.size:
        raise ValueError(f"sharpness has {np.size(sharpness)} entries, sharpness_steps {sharp_steps.size}")
    drops = np.array([sharpness_drop(s, sharpness, sharp_steps, window) for s in out])
    return out[drops >= drop] if out.size else out


def first_on_time(reference_first, model_first) -> bool:
    """``|model - reference| <= max(3 % of the reference step, 15 steps)``."""
    tol = max(FIRST_RELATIVE * abs(float(reference_first)), FIRST_ABSOLUTE)
    return bool(abs(float(model_first) - float(reference_first)) <= tol)


class CatapultMatch(NamedTuple):
    """How a model's catapults line up with a reference's (see :func:`match_catapults`)."""

    reference: tuple[int, ...]
    model: tuple[int, ...]
    matched: tuple[tuple[int, int], ...]  # (reference step, model step) pairs
    count_difference: int  # len(model) - len(reference)
    mean_timing_error: float | None  # mean |model - reference| over ``matched``
    first_timing_error: int | None  # model first minus reference first (signed)
    first_within: bool  # first catapults within max(3 %, 15 steps), or neither has one
    tolerance: float | None

    def to_json(self) -> dict:
        return {
            "reference": list(self.reference),
            "model": list(self.model),
            "matched": [list(p) for p in self.matched],
            "count_difference": self.count_difference,
            "mean_timing_error": self.mean_timing_error,
            "first_timing_error": self.first_timing_error,
            "first_within": self.first_within,
            "tolerance": self.tolerance,
        }


def _order_preserving_match(a: np.ndarray, b: np.ndarray, tol: float) -> list[tuple[int, int]]:
    """Index pairs of the most ``|a_i - b_j| <= tol`` pairs, then the least total error."""
    n, m = a.size, b.size
    count = np.zeros((n + 1, m + 1), int)
    cost = np.zeros((n + 1, m + 1))
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            options = [(count[i - 1, j], -cost[i - 1, j]), (count[i, j - 1], -cost[i, j - 1])]
            e = abs(a[i - 1] - b[j - 1])
            if e <= tol:
                options.append((count[i - 1, j - 1] + 1, -(cost[i - 1, j - 1] + e)))
            best = max(options)
            count[i, j], cost[i, j] = best[0], -best[1]
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        e = abs(a[i - 1] - b[j - 1])
        if e <= tol and count[i, j] == count[i - 1, j - 1] + 1 and np.isclose(cost[i, j], cost[i - 1, j - 1] + e):
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif count[i, j] == count[i - 1, j] and np.isclose(cost[i, j], cost[i - 1, j]):
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def match_catapults(reference_steps, model_steps, *, tolerance: float | None = None) -> CatapultMatch:
    """Compare a model's catapult steps with a reference's (e.g. the discrete run's).

    Pairs are the optimal order-preserving assignment (module docstring) among pairs at most
    ``tolerance`` steps apart (default: any distance, so ``min(n, m)`` pairs). ``first_within``
    is true when both first catapults exist and lie within ``max(3 % of the reference's step,
    15 steps)``, or when neither run has a catapult.
    """
    a = np.sort(np.asarray(reference_steps, float).ravel())
    b = np.sort(np.asarray(model_steps, float).ravel())
    tol = np.inf if tolerance is None else float(tolerance)
    pairs = _order_preserving_match(a, b, tol)
    matched = tuple((int(a[i]), int(b[j])) for i, j in pairs)
    errors = [abs(mj - ri) for ri, mj in matched]
    if a.size and b.size:
        first_err, within = int(b[0] - a[0]), first_on_time(a[0], b[0])
    else:
        first_err, within = None, bool(a.size == b.size == 0)
    return CatapultMatch(
        reference=tuple(int(x) for x in a),
        model=tuple(int(x) for x in b),
        matched=matched,
        count_difference=int(b.size - a.size),
        mean_timing_error=float(np.mean(errors)) if errors else None,
        first_timing_error=first_err,
        first_within=within,
        tolerance=None if tolerance is None else float(tolerance),
    )
