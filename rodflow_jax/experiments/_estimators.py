r"""Estimators of the *trend* of an objective's derivative in a hyperparameter.

At the edge of stability the averaged loss of a run is a wiggly function of the learning rate
(catapults shift with it), for the discrete run and for the flows alike, and the exact derivative
of one long trajectory of a chaotic map grows with the horizon (Metz et al. 2021). What a user
wants is the slope of the trend: the least-squares slope of the objective over a window
``theta (1 +- h)``. Both estimators below estimate exactly that quantity, from ``S`` antithetic
pairs of samples evaluated in one vmapped call:

* ``"es"`` (score function / evolution strategies, values only): with the window's uniform
  design ``u ~ U[-1, 1]`` and ``theta_i^{+-} = theta +- h s u_i``,

  .. math:: \hat g_j = \frac{\sum_i (f(\theta_i^+) - f(\theta_i^-))\, u_{ij}}{2 h s_j \sum_i u_{ij}^2},

  which in one dimension *is* the least-squares slope through the ``2S`` points (the empirical
  second moment in the denominator, not ``1/3``), and in expectation the least-squares slope over
  the window; with several hyperparameters the slopes are fitted jointly (least squares of the
  antithetic half-differences on ``u``, so a linear trend is recovered exactly), and the standard
  error is the fit's. Cost: ``2S`` runs, no derivatives.
* ``"smoothed"`` (reparameterised): the least-squares slope over the window equals the mean of
  ``f'`` under the parabolic kernel ``(3/4)(1 - u^2)`` (integrate by parts), so
  ``\hat g = \frac{1}{2S} \sum_i (f'(\theta_i^+) + f'(\theta_i^-))`` with ``u_i`` drawn from that
  kernel. Cost: ``2S`` exact derivatives (reverse mode, about 3 runs each).
* ``"exact"``: the derivative of the one trajectory at ``theta`` (kept; erratic at the edge).

``s_j`` is the hyperparameter's scale: ``|theta_j|`` for a rate or a weight, ``1 - theta_j`` for a
decay in ``[0, 1)`` (``b1``, ``b2``, ``momentum``, ``decay``), so ``h = 0.1`` is a +-10 % window of
the rate and of ``1 - b1``. The ``|u_i|`` are stratified (one in each of ``S`` equal-probability
bins, jittered by ``seed``; a random permutation per hyperparameter, Latin-hypercube style), which
is what makes a few pairs enough. The standard error of ``smoothed`` is the spread of the ``S``
per-pair estimates over ``sqrt(S)`` (conservative under stratification).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InputError

ESTIMATORS = ("exact", "es", "smoothed")
DEFAULT_ESTIMATOR = "es"  # measured best on averaged objectives at the edge (README, benchmarks/hypergrad_estimators.py)
# mlp-digits, 16 rates at the edge: S = 16 is within 30 % (median) of a 161-run slope at 0.2 of
# its cost; S = 4 is not (README)
DEFAULT_PAIRS = 16
DECAYS = ("b1", "b2", "momentum", "decay")


@dataclasses.dataclass(frozen=True)
class EstimatorSettings:
    """``name``, ``pairs`` S, relative half-width ``width`` h of the window, ``seed``."""

    name: str = DEFAULT_ESTIMATOR
    pairs: int = DEFAULT_PAIRS
    width: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.name not in ESTIMATORS:
            raise InputError(f"unknown estimator {self.name!r}; choose from {', '.join(ESTIMATORS)}")
        if self.name != "exact":
            if isinstance(self.pairs, bool) or not isinstance(self.pairs, int) or self.pairs < 1:
                raise InputError(f"estimator samples (pairs) must be an integer >= 1, got {self.pairs!r}")
            if not 0.0 < float(self.width) <= 0.5:
                raise InputError(f"estimator width must lie in (0, 0.5], got {self.width!r}")

    def to_json(self) -> dict:
        if self.name == "exact":
            return {"name": "exact"}
        return {"name": self.name, "pairs": self.pairs, "samples": 2 * self.pairs, "width": self.width,
                "seed": self.seed, "window": f"theta +- {self.width:g} * scale (scale |theta|; 1 - theta for "
                                             f"{', '.join(DECAYS)})"}


def scale(name: str, value: float) -> float:
    """The perturbation scale of a hyperparameter (see the module docstring)."""
    s = 1.0 - value if name in DECAYS else abs(value)
    if not s > 0:
        raise InputError(f"cannot smooth in {name} = {value:g}: its window scale is {s:g}")
    return s


def _parabolic_quantile(p: np.ndarray) -> np.ndarray:
    """``|u|`` with density ``(3/2)(1 - u^2)`` on [0, 1] at probabilities ``p`` (Newton on the CDF)."""
    u = p.copy()
    for _ in range(30):
        u = np.clip(u - ((3 * u - u**3) / 2 - p) / np.maximum(1.5 * (1 - u**2), 1e-12), 0.0, 1.0)
    return u


def offsets(settings: EstimatorSettings, dims: int) -> np.ndarray:
    """``(S, dims)`` stratified |u| in (0, 1] with random signs per (pair, dim), for the window's
    design (uniform for ``es``, parabolic for ``smoothed``)."""
    rng = np.random.default_rng(settings.seed)
    S = settings.pairs
    out = np.empty((S, dims))
    for j in range(dims):
        p = (rng.permutation(S) + rng.uniform(size=S)) / S
        mag = p if settings.name == "es" else _parabolic_quantile(p)
        out[:, j] = mag * rng.choice([-1.0, 1.0], size=S)
    return out


@dataclasses.dataclass
class Estimate:
    """A hypergradient estimate: ``value`` (the objective at ``theta`` for ``exact``, else the mean
    over the samples: the smoothed objective), ``gradient`` and ``stderr`` by name, the settings,
    and the number of objective evaluations (``runs``) and of derivatives (``derivatives``)."""

    value: float
    gradient: dict[str, Any]
    stderr: dict[str, float | None]
    settings: EstimatorSettings
    runs: int
    derivatives: int
    nonfinite: int = 0  # samples whose objective (or derivative) is not finite: diverged runs


def smoothed_estimate(f: Callable, value_and_grad: Callable, optimizer, params0, theta: dict[str, float],
                      settings: EstimatorSettings) -> Estimate:
    """``es`` or ``smoothed`` for ``f(optimizer, params0)`` around ``theta`` (names -> values):
    the ``2S`` perturbed optimizers are stacked and evaluated in one vmapped, jitted call."""
    from ._engine import stack_trees

    names = list(theta)
    S, h = settings.pairs, settings.width
    s = np.array([scale(n, float(theta[n])) for n in names])
    base = np.array([float(theta[n]) for n in names])
    u = offsets(settings, len(names))
    points = np.concatenate([base + h * s * u, base - h * s * u])  # (2S, d): + then -
    dtype = jnp.result_type(*jax.tree.leaves(params0))
    opts = stack_trees([optimizer.with_hyperparameters(**{n: jnp.asarray(v, dtype) for n, v in zip(names, p)})
                        for p in points])
    d = len(names)
    if settings.name == "es":
        vals = np.asarray(_batched_values(f, opts, params0), float)
        half_diff = (vals[:S] - vals[S:]) / (2 * h)  # = u . (s * g) for a linear trend
        coef, *_ = np.linalg.lstsq(u, half_diff, rcond=None)  # the least-squares slope, jointly in all d
        est = coef / s
        dof = S - d
        if dof > 0:
            sigma2 = float(np.sum((half_diff - u @ coef) ** 2)) / dof
            se = np.sqrt(sigma2 * np.diag(np.linalg.pinv(u.T @ u))) / s
        else:
            se = np.full(d, np.nan)
        value, runs, derivs = float(np.mean(vals)), 2 * S, 0
    else:
        vals, grads = _batched_grads(value_and_grad, opts, params0, tuple(names))
        g = np.stack([np.asarray(grads[n], float) for n in names], axis=1)  # (2S, d)
        per_pair = (g[:S] + g[S:]) / 2
        est = np.mean(per_pair, axis=0)
        se = np.std(per_pair, axis=0, ddof=1) / np.sqrt(S) if S > 1 else np.full(d, np.nan)
        value, runs, derivs = float(np.mean(np.asarray(vals))), 2 * S, 2 * S
    bad = int(np.sum(~np.isfinite(np.asarray(vals, float))))
    return Estimate(value, {n: float(e) for n, e in zip(names, est)},
                    {n: (float(x) if np.isfinite(x) else None) for n, x in zip(names, se)}, settings, runs, derivs, bad)


@eqx.filter_jit
def _batched_values(f, opts, params0):
    return eqx.filter_vmap(lambda o: f(o, params0))(opts)


@eqx.filter_jit
def _batched_grads(value_and_grad, opts, params0, names: Sequence[str]):
    def one(o):
        x = {n: getattr_hp(o, n) for n in names}
        return value_and_grad(o, x, params0)

    return eqx.filter_vmap(one)(opts)


def getattr_hp(optimizer, name):
    return optimizer.hyperparameters()[name]
