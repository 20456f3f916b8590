"""Pure comparison metrics on numpy arrays (no I/O, no JAX)."""

from __future__ import annotations

import numpy as np


def discrete_midpoints(params_k: np.ndarray, params_k1: np.ndarray) -> np.ndarray:
    """``mid_k = (z_k + z_{k+1}) / 2`` row by row."""
    return 0.5 * (params_k + params_k1)


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


def eos_onset_step(steps: np.ndarray, ratio: np.ndarray, level: float = 0.95) -> int | None:
    """First probed step at which sharpness/threshold rises to ``level``, or None.

    A run that *starts* at or above ``level`` (Adam-type methods do in their first steps, where
    the second moment holds a single gradient; GD does from a sharp initialisation) counts from
    its first return below it: the onset is the first upward crossing after that.
    """
    ratio = np.asarray(ratio, float)
    below = np.nonzero(ratio < level)[0]
    if below.size == 0:
        return None
    hit = np.nonzero(ratio[below[0] :] >= level)[0]
    return int(steps[below[0] + hit[0]]) if hit.size else None


def eos_fraction(steps: np.ndarray, ratio: np.ndarray, level: float = 0.9) -> float | None:
    """Fraction of probed steps at which sharpness/threshold >= ``level``."""
    ratio = np.asarray(ratio, float)
    ok = np.isfinite(ratio)
    return float(np.mean(ratio[ok] >= level)) if ok.any() else None


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
