"""Cost per simulated step: central flow vs rod flow vs the discrete optimizer (GD, float64).

On each problem the discrete GD run is taken to a state at the edge of stability (step ``K``,
after the measured onset), and from there the rod flow and the central flow are integrated
``N`` steps with the project's default solver (Tsit5, PID, rtol 1e-7, atol 1e-9), through
:func:`rodflow_jax.integrate` (which also saves the predicted loss and the parameters every
step). Each solve is run twice and the second, compiled, run is timed; the discrete optimizer
runs ``N`` steps the same way.

Counts: Tsit5 makes 6 new vector-field evaluations per attempted step (FSAL) plus 2 for the
initial step size; :func:`integrate` adds one save per integer step (for the central flow a save
solves the critical system again; for the rod, two losses). A rod evaluation is 2 gradients. A
central evaluation is 2 gradients, ``num_iter + k`` HVPs (Lanczos on ``D H D`` and ``H W``),
``k`` HVPs linearised for ``M = W^T H W``, ``p = k(k+1)/2`` reverse third-derivative passes
(``grad_w w_a^T H w_b``) and ``(p + 1) k`` forward third-derivative passes (``dM/dt`` along the
``p + 1`` velocity directions). The measured time of one evaluation, in gradients and HVPs, is
reported too.

    python benchmarks/central_cost.py --out benchmarks/results/central_cost.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import numpy as np  # noqa: E402

import rodflow_jax as rf  # noqa: E402
from rodflow_jax import run_discrete  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402

TSIT5_NEW_EVALS = 6
START = {"mlp-digits": 200, "cnn-digits": 180}  # after the measured GD onsets (160, 140)


@eqx.filter_jit
def _field(flow, y):
    return flow.vector_field(0.0, y, None)


def _per_call(fn, *args, repeat=5):
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(repeat):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t) / repeat


def _timed_twice(fn):
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = fn()
    return out, first, time.perf_counter() - t


def _solve(flow, y0, K, N):
    run, first, wall = _timed_twice(lambda: rf.integrate(flow, y0, K, K + N))
    evals = TSIT5_NEW_EVALS * run.solver_steps + 2
    return run, {
        "wall_s": wall,
        "wall_first_call_s": first,
        "wall_per_step_s": wall / N,
        "solver_steps": run.solver_steps,
        "rejected_steps": run.rejected_steps,
        "evals": evals,
        "evals_per_step": evals / N,
        "saves": N + 1,
        "failed": run.failed,
    }


def bench(name: str, N: int, k: int, num_iter: int, seed: int = 0) -> dict:
    prob = rf.get_problem(name)
    loss, params0 = prob.make(seed)
    opt = rf.make_optimizer("gd", learning_rate=prob.learning_rates["gd"])
    K = START[name]
    run = run_discrete(opt, loss, params0, K + 2, save_steps=[K, K + 1])
    z0, s0 = run.state_at(K)
    z1, s1 = run.state_at(K + 1)
    probe = rf.optimizer_sharpness(opt, loss, z0.params, s0, 2, "lanczos")
    n = sum(int(np.size(x)) for x in jax.tree.leaves(params0))

    # discrete: N steps, compiled
    _, _, t_disc = _timed_twice(lambda: run_discrete(opt, loss, params0, N, save_steps=[0]))

    # unit costs
    grad = eqx.filter_jit(jax.grad(loss))
    t_grad = _per_call(grad, z0.params)
    hvp = eqx.filter_jit(lambda p, v: rf.hessian_vector_product(loss, p)(v))
    t_hvp = _per_call(hvp, z0.params, z0.params)

    rod, yr = rf.rod_flow(opt, loss, z0, s0, z1, s1)
    central, yc = rf.central_flow(opt, loss, z0, s0, s1, k=k, num_iter=num_iter)
    t_eval_rod = _per_call(_field, rod, yr)
    t_eval_central = _per_call(_field, central, yc)

    rod_run, rod_m = _solve(rod, yr, K, N)
    cen_run, cen_m = _solve(central, yc, K, N)
    p = k * (k + 1) // 2
    rod_m.update(
        gradients_per_eval=2,
        gradients_per_step=(2 * rod_m["evals"] + 2 * rod_m["saves"]) / N,
        eval_time_s=t_eval_rod,
    )
    cen_m.update(
        gradients_per_eval=2,
        hvps_per_eval=num_iter + 2 * k,
        third_derivative_passes_per_eval=p + (p + 1) * k,
        hvps_per_step=(num_iter + 2 * k) * (cen_m["evals"] + cen_m["saves"]) / N,
        third_derivative_passes_per_step=(p + (p + 1) * k) * (cen_m["evals"] + cen_m["saves"]) / N,
        gradients_per_step=2 * (cen_m["evals"] + cen_m["saves"]) / N,
        eval_time_s=t_eval_central,
        eval_time_in_gradients=t_eval_central / t_grad,
        eval_time_in_hvps=t_eval_central / t_hvp,
    )
    disc = {"wall_s": t_disc, "wall_per_step_s": t_disc / N, "gradients_per_step": 1.0}
    per_step = {m: d["wall_per_step_s"] for m, d in (("discrete", disc), ("rod", rod_m), ("central", cen_m))}
    return {
        "problem": name,
        "num_params": n,
        "learning_rate": float(prob.learning_rates["gd"]),
        "start_step": K,
        "simulated_steps": N,
        "sharpness_at_start": [float(x) for x in probe.eigenvalues],
        "threshold": float(probe.threshold),
        "central_k": k,
        "central_lanczos_iter": num_iter,
        "gradient_time_s": t_grad,
        "hvp_time_s": t_hvp,
        "discrete": disc,
        "rod": rod_m,
        "central": cen_m,
        "ratios": {
            "central_over_rod_wall_per_step": per_step["central"] / per_step["rod"],
            "rod_over_discrete_wall_per_step": per_step["rod"] / per_step["discrete"],
            "central_over_discrete_wall_per_step": per_step["central"] / per_step["discrete"],
            "central_over_rod_eval_time": t_eval_central / t_eval_rod,
            "central_over_rod_evals_per_step": cen_m["evals_per_step"] / rod_m["evals_per_step"],
        },
        "central_final_param_distance_from_rod": float(
            np.linalg.norm(_flat(cen_run.centre, -1) - _flat(rod_run.centre, -1))
            / np.linalg.norm(_flat(rod_run.centre, -1) - _flat(rod_run.centre, 0))
        ),
    }


def _flat(tree, i):
    return np.concatenate([np.ravel(np.asarray(x)[i]) for x in jax.tree.leaves(tree)])


def _table(results) -> str:
    rows = [
        f"{'problem':11s} {'model':9s} {'wall/step ms':>12s} {'evals/step':>10s} {'grads/step':>10s} "
        f"{'HVPs/step':>9s} {'3rd/step':>8s}"
    ]
    for r in results:
        for m in ("discrete", "rod", "central"):
            d = r[m]
            fmt = lambda key: f"{d[key]:.1f}" if key in d else "-"  # noqa: E731
            rows.append(
                f"{r['problem']:11s} {m:9s} {1e3 * d['wall_per_step_s']:12.2f} {fmt('evals_per_step'):>10s} "
                f"{fmt('gradients_per_step'):>10s} {fmt('hvps_per_step'):>9s} {fmt('third_derivative_passes_per_step'):>8s}"
            )
        q = r["ratios"]
        rows.append(
            f"{'':11s} central/rod per step {q['central_over_rod_wall_per_step']:.1f}x "
            f"(per evaluation {q['central_over_rod_eval_time']:.1f}x, evaluations {q['central_over_rod_evals_per_step']:.2f}x); "
            f"rod/discrete {q['rod_over_discrete_wall_per_step']:.1f}x"
        )
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="mlp-digits,cnn-digits")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--num-iter", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results/central_cost.json")
    args = ap.parse_args()
    results = []
    for name in args.problems.split(","):
        results.append(bench(name, args.steps, args.k, args.num_iter))
        print(_table(results[-1:]), flush=True)
    out = {
        "description": __doc__.split("\n\n")[0],
        "platform": {"machine": platform.machine(), "processor": platform.processor(), "jax": jax.__version__,
                     "backend": jax.default_backend(), "cpus": jax.local_device_count()},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), out)
    print(_table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
