"""Hypergradient estimators at the edge of stability against a well-converged trend slope.

For each problem (GD, the loss averaged over the last ``--window`` of ``--steps`` steps) and each
learning rate of a ladder at the edge:

* the **reference**: the least-squares slope of the *discrete* objective over ``lr (1 +- 0.1)``
  from a dense uniform grid of ``--ref-points`` discrete runs (one vmapped call), with its
  standard error from the fit's residuals (the wiggle); a rate is *resolved* where
  |slope| > 2 standard errors; the slope from every other point is kept as a convergence check;
* each **estimator** (``exact``, ``es``, ``smoothed``; through the discrete run and through the rod
  flow, and ``exact`` through the central flow where asked) via ``rf.estimate_hypergradient``.

Reported per problem and estimator: sign agreement with the reference, the median relative error
|est - ref| / |ref|, the median |est| / |ref|, the cost per estimate in gradient evaluations
(discrete run: N; a derivative: 3 N, the usual reverse-mode factor; a rod solve: its measured
solver steps x 6 Tsit5 stages x 2 endpoints) and as a fraction of the reference's cost, and the
wall time. Writes ``benchmarks/results/hypergrad_estimators.json``.

    python benchmarks/hypergrad_estimators.py                       # mlp-digits, 16 rates
    python benchmarks/hypergrad_estimators.py --problems transformer-sort,cnn-digits --rates 6
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import rodflow_jax as rf  # noqa: E402
from rodflow_jax.experiments import objective_fn, stack_trees, write_json  # noqa: E402

OUT = Path(__file__).parent / "results" / "hypergrad_estimators.json"
ESTIMATORS = {  # name -> (model, estimator, pairs)
    "discrete exact": ("discrete", "exact", 0),
    "discrete es S=2": ("discrete", "es", 2),
    "discrete es S=4": ("discrete", "es", 4),
    "discrete es S=16": ("discrete", "es", 16),
    "discrete smoothed S=4": ("discrete", "smoothed", 4),
    "rod exact": ("rod", "exact", 0),
    "rod es S=2": ("rod", "es", 2),
    "rod es S=4": ("rod", "es", 4),
    "rod smoothed S=2": ("rod", "smoothed", 2),
    "central exact": ("central", "exact", 0),
}
LADDERS = {"mlp-digits": (0.22, 0.5), "transformer-sort": (0.3, 0.9), "cnn-digits": (0.15, 0.4)}


@eqx.filter_jit
def _values(f, opts, p0):
    return eqx.filter_vmap(lambda o: f(o, p0))(opts)


def reference_slopes(loss_fn, p0, rates, steps, objective, points, width=0.1):
    """LS slope of the discrete objective over lr (1 +- width), ``points`` uniform rates each, its
    standard error (from the residuals: the wiggle), and the slope from every other point."""
    f = objective_fn(loss_fn, steps, objective=objective, model="discrete")
    grid = np.linspace(-width, width, points)
    out, se, half, wiggle = [], [], [], []
    for lr in rates:
        xs = lr * (1 + grid)
        opts = stack_trees([rf.make_optimizer("gd", learning_rate=jnp.asarray(x)) for x in xs])
        ys = np.asarray(_values(f, opts, p0))
        coef = np.polyfit(xs, ys, 1)
        res = ys - np.polyval(coef, xs)
        out.append(float(coef[0]))
        se.append(float(np.std(res, ddof=2) / (np.sqrt(points) * np.std(xs))))
        wiggle.append(float(np.std(res, ddof=2)))
        half.append(float(np.polyfit(xs[::2], ys[::2], 1)[0]))
    return np.array(out), np.array(se), np.array(half), np.array(wiggle)


def rod_grads_per_solve(loss_fn, p0, lr, steps):
    res = rf.compare(loss_fn, p0, rf.make_optimizer("gd", learning_rate=lr), steps, models=("discrete", "rod"),
                     probe_every=steps)
    return res.metrics["rod"]["solver_steps"] * 6 * 2


def run_problem(problem, rates, steps, window, points, names, save=lambda partial: None):
    loss_fn, p0 = rf.get_problem(problem).make(0)
    objective = f"mean_loss_last:{window}"
    t = time.perf_counter()
    ref, ref_se, ref_half, wiggle = reference_slopes(loss_fn, p0, rates, steps, objective, points)
    ref_wall = time.perf_counter() - t
    ref_cost = points * steps
    conv = float(np.median(np.abs(ref_half - ref) / np.abs(ref)))
    sig = np.abs(ref) > 2 * ref_se  # rates whose trend slope is resolved: |ref| > 2 standard errors
    onset = rf.sweep(problem, "gd", {"learning_rate": list(rates)}, num_steps=steps, models=("discrete",))
    eos = [r["eos_onset_step"] for r in onset.records]
    rod_grads = None
    rows = {}

    def summary(rows):
        return _summary(problem, steps, objective, rates, eos, points, ref, ref_se, wiggle, sig, ref_half, conv,
                        ref_cost, ref_wall, rod_grads, rows)

    for name in names:
        model, estimator, pairs = ESTIMATORS[name]
        if model == "rod" and rod_grads is None:
            rod_grads = rod_grads_per_solve(loss_fn, p0, float(np.median(rates)), steps)
        est, se, walls = [], [], []
        for lr in rates:
            opt = rf.make_optimizer("gd", learning_rate=float(lr))
            t = time.perf_counter()
            e = rf.estimate_hypergradient(loss_fn, p0, opt, steps, objective=objective, model=model,
                                          estimator=estimator, pairs=max(pairs, 1), start_step=0)
            walls.append(time.perf_counter() - t)
            est.append(e.gradient["learning_rate"])
            se.append(e.stderr["learning_rate"])
        est = np.array(est)
        per_solve = steps if model == "discrete" else (rod_grads if model == "rod" else None)
        n = 1 if estimator == "exact" else 2 * pairs
        factor = 1 if estimator == "es" else 3
        cost = None if per_solve is None else n * factor * per_solve
        rel = np.abs(est - ref) / np.abs(ref)
        agree = np.sign(est) == np.sign(ref)
        rows[name] = {
            "estimates": est.tolist(), "stderr": se, "sign_agreement": int(np.sum(agree)),
            "sign_agreement_resolved": int(np.sum(agree & sig)), "resolved": int(np.sum(sig)),
            "median_rel_error": float(np.median(rel)),
            "median_rel_error_resolved": float(np.median(rel[sig])) if sig.any() else None,
            "median_abs_error_over_ref_se": float(np.median(np.abs(est - ref) / ref_se)),
            "median_magnitude_ratio": float(np.median(np.abs(est / ref))),
            "grad_evals_per_estimate": cost, "cost_vs_reference": None if cost is None else cost / ref_cost,
            "wall_s_per_estimate": float(np.median(walls[1:] if len(walls) > 1 else walls)),
        }
        r = rows[name]
        print(f"{problem:17s} {name:22s} {r['sign_agreement']:3d}/{len(rates):<3d} "
              f"{r['sign_agreement_resolved']:3d}/{r['resolved']:<3d} {r['median_rel_error']:9.3g} "
              f"{r['median_rel_error_resolved'] if r['median_rel_error_resolved'] is not None else float('nan'):9.3g} "
              f"{r['median_abs_error_over_ref_se']:8.3g} "
              f"{r['median_magnitude_ratio']:9.3g} {cost if cost is not None else '-':>10} "
              f"{r['cost_vs_reference'] if r['cost_vs_reference'] is not None else float('nan'):8.3f} "
              f"{r['wall_s_per_estimate']:7.2f}s", flush=True)
        save(summary(rows))
    return summary(rows)


def _summary(problem, steps, objective, rates, eos, points, ref, ref_se, wiggle, sig, ref_half, conv, ref_cost, ref_wall,
             rod_grads, rows):
    return {"problem": problem, "optimizer": "gd", "steps": steps, "objective": objective, "rates": list(map(float, rates)),
            "eos_onset_step": eos, "reference": {"points": points, "width": 0.1, "slopes": ref.tolist(),
                                                 "standard_errors": ref_se.tolist(), "wiggle_std": wiggle.tolist(),
                                                 "resolved": sig.tolist(),
                                                 "every_other_point_slopes": ref_half.tolist(),
                                                 "median_rel_change_every_other": conv,
                                                 "grad_evals": ref_cost, "wall_s": ref_wall},
            "rod_grad_evals_per_solve": rod_grads, "estimators": rows}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="mlp-digits")
    ap.add_argument("--rates", type=int, default=16)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--ref-points", type=int, default=161)
    ap.add_argument("--estimators", default=",".join(ESTIMATORS))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    names = args.estimators.split(",")
    print(f"{'problem':17s} {'estimator':22s} {'sign':>7s} {'resolved':>7s} {'med rel':>9s} {'(resolv.)':>9s} "
          f"{'err/se_ref':>8s} {'|est/ref|':>9s} {'grads':>10s} {'cost/ref':>8s} {'wall':>8s}")
    results = []
    for problem in args.problems.split(","):
        lo, hi = LADDERS.get(problem, (0.15, 0.6))
        rates = np.geomspace(lo, hi, args.rates)
        def save(partial, done=list(results)):
            write_json(Path(args.out), {"machine": platform.machine(), "jax": jax.__version__,
                                        "results": done + [partial]})

        results.append(run_problem(problem, rates, args.steps, args.window, args.ref_points, names, save))
        write_json(Path(args.out), {"machine": platform.machine(), "jax": jax.__version__, "results": results})


if __name__ == "__main__":
    main()
