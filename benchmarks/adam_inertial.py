"""The Adam family's inertial rod (b1 as the momentum) against its first-order rod.

For each problem and Adam-family optimizer at the problem's default hyperparameters (float64,
default steps and start step): one ``compare`` with discrete, rod and inertial, and the parameter
errors, catapult counts and first-catapult timing of each. Writes
``benchmarks/results/adam_inertial.json``.

    python benchmarks/adam_inertial.py [--problems mlp-digits,deep-linear] [--optimizers adam,nadam]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import rodflow_jax as rf  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402

OUT = Path(__file__).parent / "results" / "adam_inertial.json"
FAMILY = ("adam", "nadam", "scalar_adam", "scalar_nadam")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="mlp-digits,deep-linear")
    ap.add_argument("--optimizers", default=",".join(FAMILY))
    ap.add_argument("--b1", type=float, default=None, help="override b1 (default: the problem's, else 0.9)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    rows = []
    print(f"{'problem':12s} {'optimizer':13s} {'rod fin':>8s} {'inert fin':>9s} {'rod max':>8s} {'inert max':>9s} "
          f"{'cats d/rod/inert':>17s} {'dt1 rod/inert':>14s} {'wall':>6s}")
    for problem in args.problems.split(","):
        prob = rf.get_problem(problem)
        loss_fn, p0 = prob.make(0)
        for name in args.optimizers.split(","):
            hp = {"learning_rate": prob.learning_rates[name], **prob.hyperparameters.get(name, {})}
            if args.b1 is not None:
                hp["b1"] = args.b1
            t = time.perf_counter()
            res = rf.compare(loss_fn, p0, rf.make_optimizer(name, **hp), prob.default_steps,
                             models=("discrete", "rod", "inertial"))
            m = res.metrics
            d, r, i = m["discrete"], m["rod"], m["inertial"]
            row = {"problem": problem, "optimizer": name, "hyperparameters": hp, "start_step": m["start_step"],
                   "rod": {k: r.get(k) for k in ("param_rel_error_final", "param_rel_error_max", "catapult_steps",
                                                 "first_catapult_timing_error", "solver_steps", "failed", "message")},
                   "inertial": {k: i.get(k) for k in ("param_rel_error_final", "param_rel_error_max", "catapult_steps",
                                                      "first_catapult_timing_error", "solver_steps", "failed",
                                                      "message")},
                   "discrete_catapults": d.get("catapult_steps"), "wall_s": time.perf_counter() - t}
            rows.append(row)
            f = lambda x: f"{x:.3g}" if isinstance(x, (int, float)) else "-"  # noqa: E731
            print(f"{problem:12s} {name:13s} {f(r['param_rel_error_final']):>8s} {f(i['param_rel_error_final']):>9s} "
                  f"{f(r['param_rel_error_max']):>8s} {f(i['param_rel_error_max']):>9s} "
                  f"{len(d['catapult_steps'] or []):>5d}/{len(r['catapult_steps'] or []):d}/{len(i['catapult_steps'] or []):d}"
                  f"{'':>8s} {f(r.get('first_catapult_timing_error'))}/{f(i.get('first_catapult_timing_error')):>6s} "
                  f"{row['wall_s']:5.0f}s", flush=True)
            write_json(Path(args.out), rows)


if __name__ == "__main__":
    main()
