"""``rf.tune`` (hypergradient descent on the ``es`` trend slope) against a grid search of equal cost.

For each case (problem, optimizer, start, hyperparameters moved) the tuning loop runs
``--iterations`` iterations of ``2 x --pairs`` discrete runs; the grid search gets the same number
of runs, log-uniform over the range the loop can reach (``start x exp(+-iterations x step)``; for
a decay, in ``1 - decay``), and keeps its best point. Both choices are then scored by their
*trend*: the objective averaged over ``--score-points`` rates in a +-10 % window (so a lucky
wiggle does not count), and by the raw objective. Writes ``benchmarks/results/tune.json``.

    python benchmarks/tune.py
"""

from __future__ import annotations

import argparse
import itertools
import math
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import rodflow_jax as rf  # noqa: E402
from rodflow_jax.experiments import objective_fn, stack_trees, write_json  # noqa: E402

OUT = Path(__file__).parent / "results" / "tune.json"
CASES = [  # problem, optimizer, start hyperparameters, moved
    ("mlp-digits", "gd", {"learning_rate": 0.05}, ("learning_rate",)),
    ("mlp-digits", "gd", {"learning_rate": 0.6}, ("learning_rate",)),  # samples diverge at first
    ("mlp-digits", "heavy_ball", {"learning_rate": 0.05, "momentum": 0.5}, ("learning_rate", "momentum")),
]
DECAYS = ("b1", "b2", "momentum", "decay")


@eqx.filter_jit
def _values(f, opts, p0):
    return eqx.filter_vmap(lambda o: f(o, p0))(opts)


def _eval(f, p0, name, points):
    opts = stack_trees([rf.make_optimizer(name, **{k: jnp.asarray(v) for k, v in hp.items()}) for hp in points])
    return np.asarray(_values(f, opts, p0))


def _window(hp, n, width=0.1):
    names = list(hp)
    grid = np.linspace(-width, width, n)
    out = []
    for offs in itertools.product(grid, repeat=len(names)) if len(names) > 1 else ((g,) for g in grid):
        out.append({k: (1 - (1 - v) * (1 + o)) if k in DECAYS else v * (1 + o) for (k, v), o in zip(hp.items(), offs)})
    return out


def run_case(problem, name, start, moved, args):
    loss_fn, p0 = rf.get_problem(problem).make(0)
    objective = f"mean_loss_last:{args.window}"
    f = objective_fn(loss_fn, args.steps, objective=objective, model="discrete")
    res = rf.tune(loss_fn, p0, rf.make_optimizer(name, **start), args.steps, objective=objective, wrt=moved,
                  iterations=args.iterations, step=args.step, pairs=args.pairs)
    budget = res.runs
    reach = args.iterations * args.step
    per_dim = max(2, int(round(budget ** (1 / len(moved)))))
    axes = []
    for k in moved:
        v = start[k]
        z = np.linspace(-reach, reach, per_dim)
        axes.append(1 - (1 - v) * np.exp(z) if k in DECAYS else v * np.exp(z))
    grid = [dict(zip(moved, c)) for c in itertools.product(*axes)]
    grid = [{**start, **g} for g in grid if all(0 <= g[k] < 1 for k in moved if k in DECAYS)]
    vals = _eval(f, p0, name, grid)
    vals = np.where(np.isfinite(vals), vals, np.inf)
    best = grid[int(np.argmin(vals))]
    tuned = {**start, **res.hyperparameters}
    n = args.score_points if len(moved) == 1 else int(round(math.sqrt(args.score_points)))

    def score(hp):
        ys = _eval(f, p0, name, [{**hp, **w} for w in _window({k: hp[k] for k in moved}, n)])
        return float(np.mean(ys)), float(_eval(f, p0, name, [hp])[0])

    st, sr = score(tuned)
    gt, gr = score(best)
    s0 = score(start)
    row = {"problem": problem, "optimizer": name, "start": start, "moved": list(moved), "runs": budget,
           "grid_runs": len(grid), "tuned": tuned, "grid_best": best,
           "trend_score": {"start": s0[0], "tuned": st, "grid": gt}, "raw_objective": {"start": s0[1], "tuned": sr, "grid": gr},
           "history": res.history}
    print(f"{problem:11s} {name:10s} {json_hp(start):32s} {budget:4d} runs | tuned {json_hp(res.hyperparameters):30s} "
          f"trend {st:.5g} raw {sr:.5g} | grid {json_hp({k: best[k] for k in moved}):30s} trend {gt:.5g} raw {gr:.5g} "
          f"| start trend {s0[0]:.5g}", flush=True)
    return row


def json_hp(hp):
    return ", ".join(f"{k}={v:.4g}" for k, v in hp.items())


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--step", type=float, default=0.2)
    ap.add_argument("--score-points", type=int, default=41)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    rows = [run_case(*case, args) for case in CASES]
    write_json(Path(args.out), {"settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
