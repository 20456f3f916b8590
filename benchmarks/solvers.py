"""Choosing the rod flow's solver: accuracy against a tight-tolerance reference, and cost.

For GD and Adam on the digits MLP (float64), integrates the rod flow with several solvers and
tolerances, and reports the relative parameter-space distance of each solution's centre from a
reference (Tsit5 at rtol 1e-10, atol 1e-12), the distance of the predicted loss, the solver
steps and vector-field evaluations per simulated step, and the wall time.

    python benchmarks/solvers.py --out benchmarks/results/solvers.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import numpy as np  # noqa: E402

import rodflow_jax as rf  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402


def _rows(tree):
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)

CANDIDATES = [
    ("Tsit5", 1e-5, 1e-7),
    ("Tsit5", 1e-6, 1e-8),
    ("Tsit5", 1e-7, 1e-9),
    ("Tsit5", 1e-8, 1e-10),
    ("Dopri5", 1e-7, 1e-9),
    ("Dopri8", 1e-7, 1e-9),
    ("Bosh3", 1e-7, 1e-9),
]
STAGES = {"Tsit5": 6, "Dopri5": 6, "Dopri8": 12, "Bosh3": 3}


def run(name, steps, start):
    prob = rf.get_problem("mlp-digits")
    loss_fn, params0 = prob.make(0)
    opt = rf.make_optimizer(name, learning_rate=prob.learning_rates[name], **prob.hyperparameters.get(name, {}))
    disc = rf.run_discrete(opt, loss_fn, params0, start + 1, save_steps=[start, start + 1])
    z0, s0 = disc.state_at(start)
    z1, s1 = disc.state_at(start + 1)
    flow, y0 = rf.rod_flow(opt, loss_fn, z0, s0, z1, s1)
    end = steps - 1
    ref = rf.integrate(flow, y0, start, end, config=rf.SolverConfig(diffrax.Tsit5(), 1e-10, 1e-12, 512))
    ref_c = _rows(ref.centre)
    scale = np.linalg.norm(ref_c - ref_c[0], axis=1)
    out = []
    for solver, rtol, atol in CANDIDATES:
        cfg = rf.SolverConfig(getattr(diffrax, solver)(), rtol, atol, 256)
        rf.integrate(flow, y0, start, start + 5, config=cfg)  # compile
        t = time.perf_counter()
        sol = rf.integrate(flow, y0, start, end, config=cfg)
        wall = time.perf_counter() - t
        c = _rows(sol.centre)
        err = np.linalg.norm(c - ref_c, axis=1)[1:] / scale[1:]
        n = end - start
        out.append({
            "optimizer": name, "solver": solver, "rtol": rtol, "atol": atol,
            "failed": sol.failed,
            "param_dist_to_reference_max": float(np.nanmax(err)),
            "param_dist_to_reference_final": float(err[-1]),
            "loss_dist_to_reference_max": float(np.nanmax(np.abs(sol.loss - ref.loss) / ref.loss)),
            "solver_steps_per_step": sol.solver_steps / n,
            "vf_evals_per_step": STAGES[solver] * sol.solver_steps / n,
            "wall_s": wall,
        })
        r = out[-1]
        print(f"| {name} | {solver} | {rtol:g} | {r['param_dist_to_reference_final']:.2e} | {r['param_dist_to_reference_max']:.2e} "
              f"| {r['loss_dist_to_reference_max']:.2e} | {r['solver_steps_per_step']:.2f} | {r['vf_evals_per_step']:.1f} | {wall:.1f} |",
              flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/solvers.json")
    args = ap.parse_args()
    print("| optimizer | solver | rtol | dist. to ref (final) | (max) | loss dist (max) | solver steps / step | VF evals / step | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = run("gd", args.steps, 0) + run("adam", args.steps, 100)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), {"machine": f"{platform.machine()} cpus={jax.device_count()}", "rows": rows})


if __name__ == "__main__":
    main()
