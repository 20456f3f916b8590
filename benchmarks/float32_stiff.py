"""Float32 stiff stable flows: the Newton-Krylov stage solver with and without its stall rule.

In float32 the implicit solve's Newton convergence test asks for an update below ``kappa rtol``
(1e-2 x 1e-5) of the iterate, about one float32 rounding unit, so an iteration often stops
contracting at the rounding floor with a rate of 1 and used to be counted as diverging: the step
is rejected and ``dt`` cut 5x. ``NewtonKrylov.rounding_floor`` (default 100 rounding units)
counts such a stall as converged. For each adaptive optimizer at each problem's default
hyperparameters, ``compare(..., models=("discrete", "stable"))`` in float32 runs twice:

* ``before``: :func:`rodflow_jax._integrate.stiff_solver` with ``rounding_floor=0`` (the rule off);
* ``after``: the default :func:`~rodflow_jax._integrate.stiff_solver`.

Reported: the stable flow's solver steps (accepted + rejected), rejected steps, failure, wall
time of the stable solve (compile included, as a user sees it), and its distance to the discrete
midpoints relative to the path (``param_rel_error_final``). ``tanh-regression`` is a problem
the built-ins do not cover, generated here: a 5-16-1 tanh network (112 parameters) on 64 points
of ``sin(w . x) + noise``, scalar Adam/RMSProp at lr 0.3, the others at 0.03, 400 steps.

    python benchmarks/float32_stiff.py                       # prints a table, writes the JSON
    python benchmarks/float32_stiff.py --problems tanh-regression --optimizers scalar_adam
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import rodflow_jax as rf
from rodflow_jax.problems import Problem
from rodflow_jax import _integrate as I
from rodflow_jax.experiments import write_json

OUT = Path(__file__).parent / "results" / "float32_stiff.json"
NAMES = ["rmsprop", "scalar_rmsprop", "adam", "scalar_adam", "nadam", "scalar_nadam"]


def make_tanh(seed: int = 0):
    k = jax.random.split(jax.random.PRNGKey(100 + seed), 4)
    X = jax.random.normal(k[0], (64, 5))
    y = jnp.sin(X @ jnp.array([1.0, -0.5, 0.3, 0.8, -1.2])) + 0.1 * jax.random.normal(k[1], (64,))
    params0 = {"W": jax.random.normal(k[2], (5, 16)) / jnp.sqrt(5.0), "b": jnp.zeros(16),
               "v": jax.random.normal(k[3], (16,)) / 4.0}

    def loss_fn(p):
        return 0.5 * jnp.mean((jnp.tanh(X @ p["W"] + p["b"]) @ p["v"] - y) ** 2)

    return loss_fn, params0


TANH = Problem("tanh-regression", "5-16-1 tanh network, synthetic regression", make_tanh, 400,
                  {n: (0.3 if n.startswith("scalar") else 0.03) for n in NAMES})


def _problem(name):
    return TANH if name == TANH.name else rf.get_problem(name)


def run_cell(prob, name, steps):
    loss_fn, params0 = prob.make(0)
    opt = rf.make_optimizer(name, learning_rate=prob.learning_rates[name], **prob.hyperparameters.get(name, {}))
    base = I.stiff_solver(jnp.float32)
    rows = []
    for part, solver in (("before", I.implicit_solver(rounding_floor=0.0)), ("after", base.solver)):
        floor = solver.root_finder.rounding_floor
        cfg = dataclasses.replace(base, solver=solver)
        c = rf.compare(loss_fn, params0, opt, steps, models=("discrete", "stable"), solver={"stable": cfg})
        m = c.metrics["stable"]
        row = {"problem": prob.name, "optimizer": name, "part": part, "rounding_floor": floor, "num_steps": steps,
               "start_step": c.metrics.get("start_step"),
               "solver_steps": m["solver_steps"], "rejected_steps": m["rejected_steps"],
               "failed": m["failed"], "failed_at": m["failed_at"], "message": m["message"],
               "param_rel_error_final": m["param_rel_error_final"],
               "param_rel_error_max": m["param_rel_error_max"],
               "discrete_diverged_at": c.metrics["discrete"].get("diverged_at"),
               "stable_wall_s": c.timings["stable"]}
        rows.append(row)
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def _fmt(x):
    return "-" if x is None else f"{x:.3g}"


def table(rows):
    by = {(r["problem"], r["optimizer"], r["part"]): r for r in rows}
    lines = ["| problem | optimizer | solver steps, before -> after | rejected, before -> after | stable wall s, "
             "before -> after | error vs discrete final, before -> after | failed, before / after |",
             "|---|---|---|---|---|---|---|"]
    for (p, o, part), b in by.items():
        if part != "before" or (p, o, "after") not in by:
            continue
        a = by[(p, o, "after")]
        fail = lambda r: f"at {r['failed_at']}" if r["failed"] else "no"  # noqa: E731
        lines.append(f"| {p} | {o} | {b['solver_steps']} -> {a['solver_steps']} | {b['rejected_steps']} -> "
                     f"{a['rejected_steps']} | {b['stable_wall_s']:.1f} -> {a['stable_wall_s']:.1f} | "
                     f"{_fmt(b['param_rel_error_final'])} -> {_fmt(a['param_rel_error_final'])} | "
                     f"{fail(b)} / {fail(a)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="toy,deep-linear,mlp-digits,tanh-regression")
    p.add_argument("--optimizers", default=",".join(NAMES))
    p.add_argument("--steps", default="", help="per-problem steps, e.g. mlp-digits=600 (default: the problem's)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if jax.config.jax_enable_x64:
        raise SystemExit("float32_stiff.py measures float32: run it without JAX_ENABLE_X64")
    steps = dict(kv.split("=") for kv in args.steps.split(",") if kv)
    rows, t0 = [], time.perf_counter()
    for pname in args.problems.split(","):
        prob = _problem(pname)
        for name in args.optimizers.split(","):
            if name in prob.float64_only:
                continue
            rows.extend(run_cell(prob, name, int(steps.get(pname, prob.default_steps))))
    print(table(rows))
    write_json(Path(args.out), {"machine": platform.processor() or platform.machine(), "cpus": jax.device_count(),
                                "dtype": "float32", "wall_s": time.perf_counter() - t0, "rows": rows})


if __name__ == "__main__":
    main()
