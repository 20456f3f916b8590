"""Pure comparison metrics on numpy arrays (no I/O, no JAX)."""

from __future__ import annotations

import numpy as np


def param_rel_error(pred: np.ndarray, mid: np.ndarray, mid_start: np.ndarray) -> np.ndarray:
    """``||pred_k - mid_k|| / ||mid_k - mid_K||`` for each row k (NaN where the denominator is 0)."""
    with np.errstate(all="ignore"):  # diverged rows are inf/NaN and stay so
        num = np.linalg.norm(pred - mid, axis=-1)
        den = np.linalg.norm(mid - mid_start, axis=-1)
        return np.where(den > 0, num / den, np.nan)


def late_window(steps: np.ndarray, start_step: int, num_steps: int) -> np.ndarray:
    """Mask of steps ``k >= K + (N - K)/10``: where errors are large enough to mean something."""
    return steps >= start_step + (num_steps - start_step) / 10


def nan_max(x: np.ndarray) -> float | None:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(x.max()) if x.size else None


def last_finite(x: np.ndarray) -> float | None:
    x = np.asarray(x, float)
    ok = np.nonzero(np.isfinite(x))[0]
    return float(x[ok[-1]]) if ok.size else None


def loss_rel_error(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(pred - ref) / np.abs(ref)


def windowed_log_loss_error(pred: np.ndarray, ref: np.ndarray, window: int = 50) -> float | None:
    """Mean over ``window``-step windows of ``|log mean(pred) - log mean(ref)|``.

    A flow that reproduces catapult spikes at the right height and rate but out of phase is
    scored fairly by this, unlike a pointwise error.
    """
    n = (len(pred) // window) * window
    if n == 0:
        return None
    p = pred[:n].reshape(-1, window).mean(axis=1)
    r = ref[:n].reshape(-1, window).mean(axis=1)
    ok = (p > 0) & (r > 0) & np.isfinite(p) & np.isfinite(r)
    if not ok.any():
        return None
    return float(np.mean(np.abs(np.log(p[ok]) - np.log(r[ok]))))


def first_upcrossing(steps: np.ndarray, ratio: np.ndarray, level: float) -> int | None:
    """First probed step at which ``ratio`` rises to ``level``, or None.

    A run that *starts* at or above ``level`` (Adam-type methods do in their first steps, where
    the second moment holds a single gradient; GD does from a sharp initialisation) counts from
    its first return below it; if it never returns below, the onset is its first probed step.
    """
    ratio = np.asarray(ratio, float)
    ok = np.isfinite(ratio)
    if not ok.any():
        return None
    below = np.nonzero(ok & (ratio < level))[0]
    if below.size == 0:
        return int(np.asarray(steps)[np.nonzero(ok)[0][0]])
    hit = np.nonzero(ratio[below[0]:] >= level)[0]
    return int(steps[below[0] + hit[0]]) if hit.size else None


TRANSIENT_LEVEL = 1.5  # a run that starts this far past its edge begins with a transient


def after_initial_transient(steps: np.ndarray, ratio: np.ndarray, level: float = TRANSIENT_LEVEL) -> int | None:
    """For a run that *starts* far past its edge (sharpness/threshold above ``level``, 1.5, at
    step 0), the first probed step at which the ratio is back at or below 1 (the step
    :func:`first_upcrossing` counts an onset from); None for any other run, or one that never
    comes back.

    Its first steps are then an initial catapult from a sharp initialisation, not the edge of
    stability reached by sharpening, and the flows started at step 0 start inside it. Measured on
    an unseen softplus network (GD, 600 steps, float64): from 2.3x its threshold the second-order
    rod fires the initial catapult on the discrete step; from 4.4x and 14x it runs out of its
    budget and falls back to the first-order rod, whose final error (0.88 and 1.00) is then
    hardly below the stable flow's (0.98 and 1.00). ``compare`` therefore keeps its start and
    says where this transient ends (``metrics.json``'s ``start_note``), so that
    ``--start-step`` can skip it."""
    ratio = np.asarray(ratio, float)
    steps = np.asarray(steps)
    if ratio.size == 0 or steps[0] != 0 or not np.isfinite(ratio[0]) or ratio[0] <= level:
        return None
    back = np.nonzero(np.isfinite(ratio) & (ratio <= 1.0))[0]
    return int(steps[back[0]]) if back.size else None


def eos_onset_step(steps: np.ndarray, ratio: np.ndarray, level: float = 0.95) -> int | None:
    """The edge-of-stability onset: the first probed step with sharpness/threshold >= ``level``
    (95 %), by :func:`first_upcrossing`'s rule."""
    return first_upcrossing(steps, ratio, level)


def eos_fraction(steps: np.ndarray, ratio: np.ndarray, level: float = 0.9, onset_level: float = 0.95) -> float:
    """Share of the probes from the onset on at which sharpness/threshold >= ``level``; 0 for a run
    that never reaches the onset (a run held at 0.9 of the threshold is not at the edge)."""
    ratio = np.asarray(ratio, float)
    onset = eos_onset_step(steps, ratio, onset_level)
    if onset is None:
        return 0.0
    after = (np.asarray(steps) >= onset) & np.isfinite(ratio)
    return float(np.mean(ratio[after] >= level)) if after.any() else 0.0


def mean_last(x: np.ndarray, fraction: float = 0.2) -> float | None:
    """Mean of the last ``fraction`` of ``x`` (at least one entry); None if any is not finite."""
    x = np.asarray(x, float)
    if x.size == 0:
        return None
    w = x[-max(1, int(round(x.size * fraction))):]
    return float(np.mean(w)) if np.all(np.isfinite(w)) else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, None where either is missing or ``b`` is 0."""
    return a / b if a is not None and b else None


def moving_average(x: np.ndarray, window: int = 5) -> np.ndarray:
    """Centred mean over ``window`` entries (fewer at the ends), skipping non-finite entries."""
    x = np.asarray(x, float)
    ok = np.isfinite(x)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, x, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    i = np.arange(x.size)
    lo, hi = np.maximum(i - window // 2, 0), np.minimum(i + window // 2 + 1, x.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n[hi] > n[lo], (c[hi] - c[lo]) / (n[hi] - n[lo]), np.nan)
