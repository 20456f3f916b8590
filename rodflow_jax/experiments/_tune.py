r"""Hypergradient descent on the trend of an averaged objective: move hyperparameters downhill.

Each iteration estimates the derivative of the objective's trend with
:func:`~._hypergrad.estimate_hypergradient` (default ``es``: the least-squares slope over a
+-``width`` window from ``2 pairs`` runs in one vmapped call) and takes a sign step in a
log coordinate: ``log theta`` for a rate or a weight, ``log(1 - theta)`` for a decay (``b1``,
``b2``, ``momentum``, ``decay``), so steps are relative and decays stay in ``[0, 1)``. The step
is ``step`` (default 0.2, i.e. about 20 % of the rate) and halves whenever a derivative changes
sign (Rprop): at the edge of stability the trend is flat and noisy near its minimum, and only the
sign of a smoothed slope is trustworthy there. A derivative within one standard error of 0 is not
followed (the step shrinks instead). Where a sample diverges (the estimate is not finite), the
window reaches past stability: the loop steps back (a smaller rate, a smaller decay) by half its
step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from .._errors import InputError
from ._estimators import DECAYS
from ._hypergrad import estimate_hypergradient, flow_start


@dataclasses.dataclass
class TuneResult:
    """The path (one dict per iteration: hyperparameters, smoothed objective, gradient, standard
    error, step), the final hyperparameters, and the total number of runs it cost."""

    history: list[dict[str, Any]]
    hyperparameters: dict[str, float]
    runs: int

    def to_json(self) -> dict:
        return {"hyperparameters": self.hyperparameters, "runs": self.runs, "history": self.history}


def _to_z(name, v):
    return math.log(1.0 - v) if name in DECAYS else math.log(v)


def _from_z(name, z):
    return 1.0 - math.exp(z) if name in DECAYS else math.exp(z)


def tune(loss_fn, params0, optimizer, num_steps: int, *, objective: str, wrt: Sequence[str] = ("learning_rate",),
         iterations: int = 8, step: float = 0.2, model: str = "discrete", estimator: str = "es", pairs: int = 4,
         width: float = 0.1, seed: int = 0, progress=False, **kw) -> TuneResult:
    """Minimise ``objective`` (e.g. ``"mean_loss_last:100"``) over the hyperparameters ``wrt`` by
    sign steps on the estimated trend derivative (module docstring). Returns a :class:`TuneResult`."""
    from ._progress import say

    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise InputError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not (step > 0 and math.isfinite(step)):
        raise InputError(f"step must be a positive finite number, got {step!r}")
    wrt = list(wrt)
    if "params0" in wrt:
        raise InputError("tune moves hyperparameters, not params0")
    hp = {w: float(optimizer.hyperparameters()[w]) for w in wrt if w in optimizer.hyperparameters()}
    z = {w: _to_z(w, v) for w, v in hp.items()}
    steps = {w: float(step) for w in hp}
    last_sign: dict[str, float] = {}
    history, runs = [], 0
    if model != "discrete":  # one start step for every iteration (an "auto" start resolved at the first)
        kw["start_step"] = flow_start(loss_fn, params0, optimizer, num_steps, model, kw.get("start_step", "auto"))
    for it in range(iterations):
        opt = optimizer.with_hyperparameters(**hp)
        est = estimate_hypergradient(loss_fn, params0, opt, num_steps, objective=objective, model=model, wrt=wrt,
                                     estimator=estimator, pairs=pairs, width=width, seed=seed + it, **kw)
        runs += est.runs
        row = {"iteration": it, "hyperparameters": dict(hp), "objective": est.value, "gradient": dict(est.gradient),
               "standard_error": dict(est.stderr), "step": dict(steps)}
        history.append(row)
        say(progress, f"tune {it}: {objective} = {est.value:.6g} at "
            + ", ".join(f"{k}={v:.6g}" for k, v in hp.items()))
        finite = all(g is not None and math.isfinite(g) for g in est.gradient.values())
        row["diverged"] = not finite
        for w in hp:
            g, se = est.gradient[w], est.stderr.get(w)
            if not finite:  # a sample diverged: the window reaches past stability; step back, more carefully
                steps[w] /= 2
                z[w] += steps[w] if w in DECAYS else -steps[w]  # a smaller rate, a smaller decay
                last_sign.pop(w, None)
                hp[w] = _from_z(w, z[w])
                continue
            dz = g * (-(1.0 - hp[w]) if w in DECAYS else hp[w])  # d objective / d z
            sign = 0.0 if (se is not None and abs(g) <= se) else math.copysign(1.0, dz)
            if sign == 0.0 or (w in last_sign and sign != last_sign[w]):
                steps[w] /= 2
            if sign != 0.0:
                z[w] -= sign * steps[w]
                last_sign[w] = sign
            hp[w] = _from_z(w, z[w])
    return TuneResult(history, dict(hp), runs)
