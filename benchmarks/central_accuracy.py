"""Accuracy of the central, rod and stable flows against the discrete run (mlp-digits, float64).

For each optimizer, :func:`rodflow_jax.compare` runs discrete, stable, rod and central from the
same state (start step "auto": K = 0 for GD and RMSProp) and we keep, per flow:
``param_rel_error_final`` / ``_max`` (||centre - mid_k|| / ||mid_k - mid_K||, max over the last
90 %), ``loss_rel_error_mean`` (pointwise, against (L_k + L_{k+1})/2), ``loss_window_log_error``
(50-step windows, log space), ``variance_window_log_error`` (rod |r|^2 and central tr Sigma
against the iterates' smoothed ||(z_{k+1} - z_k)/2||^2, 50-step windows, log space),
``sharpness_ratio_final`` and the wall time.

    python benchmarks/central_accuracy.py --out benchmarks/results/central_accuracy.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import rodflow_jax as rf  # noqa: E402
from rodflow_jax import run_discrete  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402
from rodflow_jax import lanczos  # noqa: E402

FLOWS = ("stable", "rod", "central")
KEYS = (
    "param_rel_error_final",
    "param_rel_error_max",
    "loss_rel_error_mean",
    "loss_window_log_error",
    "variance_window_log_error",
    "sharpness_ratio_final",
    "failed",
    "solver_steps",
)


def run(problem: str, optimizer: str, steps: int, start_step="auto", seed: int = 0) -> dict:
    prob = rf.get_problem(problem)
    loss, params0 = prob.make(seed)
    hp = dict(prob.hyperparameters.get(optimizer, {}))
    opt = rf.make_optimizer(optimizer, learning_rate=prob.learning_rates[optimizer], **hp)
    t = time.perf_counter()
    res = rf.compare(loss, params0, opt, steps, start_step=start_step, models=("discrete", *FLOWS))
    m = res.metrics
    out = {
        "problem": problem,
        "optimizer": m["optimizer"],
        "steps": steps,
        "start_step": m["start_step"],
        "eos_onset_step": m["eos_onset_step"],
        "wall_s": time.perf_counter() - t,
        "timings_s": m["timings_s"],
    }
    for f in FLOWS:
        out[f] = {k: m[f].get(k) for k in KEYS}
    return out


def lanczos_accuracy(problem: str, steps=(0, 100, 200, 300, 400, 600), num_iter=24, k=2, seed=0) -> dict:
    """The central flow's fixed-start Lanczos (start fixed at step 0, as ``compare`` does for GD)
    against a dense eigen-solve, at discrete GD states along the run: relative eigenvalue
    errors of the top ``k`` Ritz values and the angle of the top Ritz vector."""
    prob = rf.get_problem(problem)
    loss, params0 = prob.make(seed)
    opt = rf.make_optimizer("gd", learning_rate=prob.learning_rates["gd"])
    run = run_discrete(opt, loss, params0, max(steps) + 1, save_steps=list(steps) + [1])
    z0, s0 = run.state_at(0)
    flow, _ = rf.central_flow(opt, loss, z0, s0, s0, k=k, num_iter=num_iter)
    rows = []
    for step in steps:
        z, _ = run.state_at(step)
        x, unravel = ravel_pytree(z.params)
        _, hvp = jax.linearize(jax.grad(lambda v: loss(unravel(v))), x)
        evals, evecs = jax.jit(lambda: lanczos(hvp, flow.start, num_iter))()
        lam, u = np.asarray(evals[::-1][:k]), np.asarray(evecs[:, ::-1][:, 0])
        dense, vecs = rf.top_eigenpairs(loss, z.params, k, method="dense")
        v = np.asarray(ravel_pytree(jax.tree.map(lambda a: a[0], vecs))[0])
        rows.append({
            "step": step,
            "dense": [float(a) for a in dense],
            "lanczos": [float(a) for a in lam],
            "rel_error": [float(abs(a - b) / abs(b)) for a, b in zip(lam, np.asarray(dense))],
            "top_vector_sin_angle": float(np.sqrt(max(0.0, 1 - float(jnp.dot(u, v)) ** 2))),
        })
    return {"problem": problem, "num_iter": num_iter, "k": k, "threshold": float(opt.threshold(s0)), "rows": rows}


def _table(results) -> str:
    rows = [f"{'optimizer':15s} {'model':8s} {'err final':>9s} {'err max':>9s} {'loss rel':>9s} {'loss win':>9s} "
            f"{'var win':>8s} {'sharp/thr':>9s} {'time s':>7s}"]
    g = lambda d, k: f"{d[k]:.3g}" if isinstance(d.get(k), float) else "-"  # noqa: E731
    for r in results:
        for f in FLOWS:
            d = r[f]
            rows.append(
                f"{r['optimizer']['name']:15s} {f:8s} {g(d, 'param_rel_error_final'):>9s} {g(d, 'param_rel_error_max'):>9s} "
                f"{g(d, 'loss_rel_error_mean'):>9s} {g(d, 'loss_window_log_error'):>9s} "
                f"{g(d, 'variance_window_log_error'):>8s} {g(d, 'sharpness_ratio_final'):>9s} {r['timings_s'][f]:7.0f}"
            )
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="mlp-digits")
    ap.add_argument("--optimizers", default="gd,rmsprop")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default="benchmarks/results/central_accuracy.json")
    ap.add_argument("--start-step", default="auto")
    ap.add_argument("--lanczos-only", action="store_true", help="only the eigen-accuracy check")
    args = ap.parse_args()
    if args.lanczos_only:
        acc = lanczos_accuracy(args.problem)
        for r in acc["rows"]:
            print(r)
        write_json(Path(args.out), {"lanczos_accuracy": acc})
        return
    results = []
    for name in args.optimizers.split(","):
        start = args.start_step if args.start_step == "auto" else int(args.start_step)
        results.append(run(args.problem, name, args.steps, start))
        print(_table(results[-1:]), flush=True)
        write_json(Path(args.out), {"description": __doc__.split("\n\n")[0], "results": results})
    print(_table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
