"""Second-order (backward-error-corrected) flows against first-order ones on mlp-digits (float64).

Cases: GD at the problem's rate (0.2) and heavy ball at momentum 0.9 (rate 0.3, the fidelity
grid's momentum-0.9 rate: threshold (2 + 2 beta)/eta = 12.7), ``N`` steps, every flow started at
step 0 from the discrete ``z_0, z_1``. Flows: the rod and its second-order version (``rod2``,
:func:`rodflow_jax.flows._second_order.second_order`) for both cases, and for heavy ball the
inertial rod flow and ``inertial2`` (integrated over a short horizon only: the correction
anti-damps the inertial flow's rotation, see that module). Each rod is integrated at the
project's default tolerance (rtol 1e-7, atol 1e-9) and at a tight one (1e-9, 1e-11).

Measured per flow:

- catapults of the predicted loss (``rodflow_jax._catapults.detect_catapults``, default rule:
  rise 1.5, merge 25, sharpness drop >= 5 % within (25, 50) steps, the sharpness probed at the
  flow's centre every ``--probe-every`` steps), matched to the discrete run's (its averaged loss
  ``(L(z_k) + L(z_{k+1}))/2``, sharpness at the midpoints): first-catapult timing error
  (model - discrete), mean timing error over matched pairs, count difference;
- ``|r|`` before the edge (median over a pre-edge window): the seed the first catapult grows
  from;
- the final parameter error ``||c(N-1) - mid_{N-1}|| / ||mid_{N-1} - mid_0||`` and its maximum;
- cost: solver steps per simulated step, wall time of the solve (``compile_s`` is the wall
  time of a 2-step solve of the same flow, ``run_s`` the difference), and the time of one
  compiled vector-field evaluation.

It also tabulates the per-step growth factor of a linear r-mode (GD on a quadratic,
``eps = eta lambda - 2``): exact ``1 + eps``, first-order ``exp(eps)``, second-order
``exp(eps - eps^2/2)``.

The second-order rod's default solver holds ``r`` to a tolerance relative to its own size,
floored at ``rodflow_jax._integrate.half_atol`` (1e-12 where the centre has 1e-9) and capped at
the centre's ``atol`` (``rodflow_jax._integrate.HalfTolerance``); ``--tolerances ...,same_r`` adds
the ablation with ``r`` held to the centre's ``atol``. ``--derivatives jvp,difference`` runs the
second-order flows with each way of evaluating their correction (the first is labelled ``rod2``,
the others ``rod2_difference``, ...). ``--problem`` takes a
built-in name, ``tanh-regression`` (a 889-parameter tanh network on generated data, defined
here) or ``file.py[:make]``; ``--hp CASE=JSON`` overrides a case's hyperparameters.

    python benchmarks/second_order.py --out benchmarks/results/second_order.json
    python benchmarks/second_order.py --cases gd --tolerances default,same_r --out benchmarks/results/second_order_gd_r_atol.json
    python benchmarks/second_order.py --cases gd --tolerances default,same_r --derivatives jvp,difference \
        --out benchmarks/results/second_order_half_tolerance.json
    python benchmarks/second_order.py --problem tanh-regression --cases gd --hp 'gd={"learning_rate": 0.64}' \
        --steps 1500 --tolerances default,same_r --probe-every 10 --out benchmarks/results/second_order_tanh.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import platform
import time
from pathlib import Path

import jax
import jax.flatten_util

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import rodflow_jax as rf  # noqa: E402
from rodflow_jax._catapults import detect_catapults, match_catapults  # noqa: E402
from rodflow_jax._integrate import default_solver, half_atol  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402
from rodflow_jax.flows._second_order import second_order_solver  # noqa: E402

TOLERANCES = {"default": (1e-7, 1e-9), "tight": (1e-9, 1e-11)}
CASES = {
    "nesterov_0.9": {
        "optimizer": "nesterov",
        "hp": {"learning_rate": 0.4, "momentum": 0.9},
        "flows": ("rod", "inertial"),
        "seed_window": (10, 30),
    },
    "gd": {"optimizer": "gd", "hp": {"learning_rate": 0.2}, "flows": ("rod", "rod2"), "seed_window": (50, 150)},
    "heavy_ball_0.9": {
        "optimizer": "heavy_ball",
        "hp": {"learning_rate": 0.3, "momentum": 0.9},
        "flows": ("rod", "rod2", "inertial", "inertial2"),
        "seed_window": (10, 30),
        # rod2 sits at 2.5x the threshold from step ~100 on, where its solve costs ~15 steps per
        # step; at the tight tolerance it was measured the same (no catapult, final error 0.798,
        # 15.0 solver steps per step), so only the default tolerance is run
        "default_only": ("rod2", "inertial2"),
    },
}
INERTIAL2_HORIZON = 20  # steps: it blows up within a few (and then exhausts its step budget)


def _rows(tree) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)


def _sharpness(loss_fn, rows: np.ndarray, unravel) -> np.ndarray:
    """Top Hessian eigenvalue (30 Lanczos steps) at each row; NaN for non-finite rows."""
    ok = np.isfinite(rows).all(axis=1)
    out = np.full(len(rows), np.nan)
    if ok.any():
        probe = eqx.filter_jit(
            jax.vmap(lambda x: rf.top_eigenvalues(loss_fn, unravel(x), 1, method="lanczos", num_iter=30)[0])
        )
        out[ok] = np.asarray(probe(jnp.asarray(rows[ok])))
    return out


def _config(inner, order2: bool, tol: str):
    """The default solver (second order: twice the step budget, and ``r`` held to
    ``half_atol``) at tolerance ``tol``; ``"same_r"``: the second-order default with ``r`` held
    to the centre's ``atol`` (the ablation of ``half_atol``)."""
    base = second_order_solver(inner, jnp.float64) if order2 else default_solver(inner, jnp.float64)
    if tol == "same_r":
        return dataclasses.replace(base, half_atol=None)
    rtol, atol = TOLERANCES[tol]
    return dataclasses.replace(base, rtol=rtol, atol=atol,
                               half_atol=half_atol(jnp.float64, atol) if base.half_atol is not None else None)


def _eval_time(flow, y, repeat=20) -> float:
    f = eqx.filter_jit(lambda fl, yy: fl.vector_field(0.0, yy, None))
    jax.block_until_ready(f(flow, y))
    t = time.perf_counter()
    for _ in range(repeat):
        jax.block_until_ready(f(flow, y))
    return (time.perf_counter() - t) / repeat


def _linear_factors(epsilons=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0)):
    rows = []
    for e in epsilons:
        exact, first, second = 1 + e, math.exp(e), math.exp(e - e * e / 2)
        rows.append({"eps": e, "exact": exact, "first_order": first, "second_order": second,
                     "first_error": first - exact, "second_error": second - exact})
    return rows


def tanh_regression(seed: int = 0):
    """A problem none of the built-ins resembles: a tanh MLP 10-24-24-1 (889 parameters) on a
    generated regression task (256 points, ``y = sin(x.w/2) + 0.3 cos(x_0 x_1)``)."""
    kx, kw, kp = jax.random.split(jax.random.PRNGKey(100 + seed), 3)
    X = jax.random.normal(kx, (256, 10), jnp.float64)
    y = jnp.sin(X @ jax.random.normal(kw, (10,), jnp.float64) / 2) + 0.3 * jnp.cos(X[:, 0] * X[:, 1])
    sizes = [10, 24, 24, 1]
    keys = jax.random.split(kp, len(sizes) - 1)
    params = [(jax.random.normal(k, (a, b), jnp.float64) / jnp.sqrt(a), jnp.zeros(b, jnp.float64))
              for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

    def loss(params):
        h = X
        for i, (W, b) in enumerate(params):
            h = h @ W + b
            h = jnp.tanh(h) if i < len(params) - 1 else h
        return 0.5 * jnp.mean((h[:, 0] - y) ** 2)

    return loss, params


def make_problem(name: str, seed: int = 0):
    """``(loss_fn, params0)`` of a built-in problem, ``tanh-regression``, or ``file.py[:make]``."""
    if name == "tanh-regression":
        return tanh_regression(seed)
    if name.split(":")[0].endswith(".py"):
        path, _, fn = name.partition(":")
        spec = importlib.util.spec_from_file_location("user_problem", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return getattr(mod, fn or "make")(seed)
    return rf.get_problem(name).make(seed)


def run_case(name: str, spec: dict, N: int, probe_every: int, tolerances, seed: int = 0, problem: str = "mlp-digits",
             derivatives=("jvp",)) -> dict:
    loss_fn, params0 = make_problem(problem, seed)
    unravel = jax.flatten_util.ravel_pytree(params0)[1]
    opt = rf.make_optimizer(spec["optimizer"], **spec["hp"])
    t = time.perf_counter()
    run = rf.run_discrete(opt, loss_fn, params0, N)
    disc_wall = time.perf_counter() - t
    W = _rows(run.params)  # (N + 1, d)
    mid = 0.5 * (W[:-1] + W[1:])  # mid_k, k = 0 .. N-1
    avg = 0.5 * (run.loss[:-1] + run.loss[1:])
    probe_steps = np.arange(0, N, probe_every)
    disc_sharp = _sharpness(loss_fn, mid[probe_steps], unravel)
    disc_cat = detect_catapults(avg, sharpness=disc_sharp, sharpness_steps=probe_steps)
    z0, s0 = run.state_at(0)
    z1, s1 = run.state_at(1)
    lo, hi = spec["seed_window"]
    out = {
        "case": name, "optimizer": spec["optimizer"], "hyperparameters": spec["hp"], "num_steps": N,
        "start_step": 0, "discrete": {
            "catapults": disc_cat.tolist(), "wall_s": disc_wall,
            "sharpness_max": float(np.nanmax(disc_sharp)), "threshold": float(opt.threshold(s0)),
        },
        "flows": [],
    }
    for kind in spec["flows"]:
        order2 = kind.endswith("2")
        base_kind = {"rod": "rod1"}.get(kind.rstrip("2"), kind.rstrip("2"))  # the first-order construction
        inner, y0 = rf.make_flow(base_kind, opt, loss_fn, z0, s0, z1, s1)
        horizon = INERTIAL2_HORIZON if kind == "inertial2" else N
        tols = ("default",) if kind in spec.get("default_only", ()) else tolerances
        tols = tuple(t for t in tols if t != "same_r" or kind == "rod2")
        for derivative in (derivatives if order2 else (None,)):  # rows after the first: FLOW_DERIVATIVE
            label = kind if derivative in (None, derivatives[0]) else f"{kind}_{derivative}"
            flow = inner
            if order2:  # the registry's own start: rod2 is seeded (flows/_rounding.py), rod1 is not
                flow = rf.make_flow(kind, opt, loss_fn, z0, s0, z1, s1, derivative=derivative)[0]
            for tol in tols:
                cfg = _config(inner, order2, tol)
                t = time.perf_counter()
                rf.integrate(flow, y0, 0, 2, config=cfg, param_steps=[0])
                compile_s = time.perf_counter() - t
                fr_steps = probe_steps[probe_steps < horizon]
                param_steps = np.unique(np.concatenate([fr_steps, [horizon - 1]]))
                t = time.perf_counter()
                fr = rf.integrate(flow, y0, 0, horizon - 1, config=cfg, param_steps=param_steps)
                wall = time.perf_counter() - t
                C = _rows(fr.centre)
                idx = np.searchsorted(param_steps, fr_steps)
                sharp = _sharpness(loss_fn, C[idx], unravel)
                cat = detect_catapults(fr.loss, fr.steps, sharpness=sharp, sharpness_steps=fr_steps)
                match = match_catapults(disc_cat[disc_cat < horizon], cat)
                with np.errstate(all="ignore"):
                    err = np.linalg.norm(C - mid[param_steps], axis=1) / np.linalg.norm(mid[param_steps] - mid[0], axis=1)
                hn = fr.half_norm
                seed_r = float(np.median(hn[lo:hi])) if hn is not None and horizon > hi else None
                row = {
                    "flow": label, "derivative": derivative, "tolerance": tol, "rtol": cfg.rtol, "atol": cfg.atol,
                    "half_atol": cfg.half_atol, "simulated_steps": horizon - 1,
                    "catapults": cat.tolist(), "match": match.to_json(),
                    "final_error": float(err[-1]),
                    "max_error": float(np.nanmax(err[1:])) if np.isfinite(err[1:]).any() else None,
                    "half_norm_pre_edge": seed_r, "seed_window": [lo, hi],
                    "sharpness_max": float(np.nanmax(sharp)) if np.isfinite(sharp).any() else None,
                    "sharpness_last_probe": float(sharp[-1]),
                    "failed": fr.failed, "failed_at": fr.failed_at, "message": fr.message,
                    "solver_steps": fr.solver_steps, "rejected_steps": fr.rejected_steps,
                    "solver_steps_per_step": fr.solver_steps / (horizon - 1),
                    "wall_s": wall, "compile_s": compile_s, "run_s": max(wall - compile_s, 0.0),
                    "run_per_step_ms": 1e3 * max(wall - compile_s, 0.0) / (horizon - 1),
                    "eval_ms": 1e3 * _eval_time(flow, y0),
                }
                out["flows"].append(row)
                print(_row_line(name, row), flush=True)
    out["ratios"] = _ratios(out["flows"])
    return out


def _ratios(rows) -> dict:
    """Second-order over first-order cost, per tolerance, for the rod (and the inertial flow)."""
    out = {}
    by = {(r["flow"], r["tolerance"]): r for r in rows}
    for kind in ("rod", "inertial"):
        for tol in TOLERANCES:
            for label in sorted({f for f, _ in by if f.startswith(kind + "2")}):
                a, b = by.get((kind, tol)), by.get((label, tol))
                if a is None or b is None:
                    continue
                out[f"{label}_over_{kind}_{tol}"] = {
                    "solver_steps_per_step": b["solver_steps_per_step"] / a["solver_steps_per_step"],
                    "eval_time": b["eval_ms"] / a["eval_ms"],
                    "run_time_per_step": b["run_per_step_ms"] / a["run_per_step_ms"] if a["run_per_step_ms"] else None,
                    "wall": b["wall_s"] / a["wall_s"],
                }
    return out


HEADER = (f"{'case':15s} {'flow':9s} {'tol':7s} {'catapults':>9s} {'first':>5s} {'d_first':>7s} {'mean|d|':>7s} "
          f"{'d_count':>7s} {'|r| seed':>8s} {'S max':>5s} {'final err':>9s} {'steps/step':>10s} "
          f"{'run ms/step':>11s} {'eval ms':>7s}")


def _row_line(case, r) -> str:
    m = r["match"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    first = r["catapults"][0] if r["catapults"] else None
    failed = f"  FAILED at {r['failed_at']} ({r['message']})" if r["failed"] else ""
    return (f"{case:15s} {r['flow']:9s} {r['tolerance']:7s} {len(r['catapults']):9d} {fmt(first, 'd'):>5s} "
            f"{fmt(m['first_timing_error'], '+d'):>7s} {fmt(m['mean_timing_error'], '.1f'):>7s} "
            f"{m['count_difference']:+7d} {fmt(r['half_norm_pre_edge'], '.1e'):>8s} "
            f"{fmt(r['sharpness_max'], '.1f'):>5s} "
            f"{fmt(r['final_error'], '.3f'):>9s} "
            f"{r['solver_steps_per_step']:10.2f} {r['run_per_step_ms']:11.2f} {r['eval_ms']:7.2f}{failed}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--probe-every", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--problem", default="mlp-digits", help="built-in name, tanh-regression, or file.py[:make]")
    ap.add_argument("--hp", action="append", default=[], metavar="CASE=JSON",
                    help='override a case\'s hyperparameters, e.g. gd=\'{"learning_rate": 0.64}\'')
    ap.add_argument("--tolerances", default="default,tight")
    ap.add_argument("--derivatives", default="jvp",
                    help="how the second-order flows evaluate their correction (difference, jvp); rows after the "
                         "first are labelled FLOW_DERIVATIVE, e.g. rod2_jvp")
    ap.add_argument("--out", default="benchmarks/results/second_order.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(HEADER)
    results = []
    overrides = dict(h.split("=", 1) for h in args.hp)
    for name in args.cases.split(","):
        spec = dict(CASES[name])
        if name in overrides:
            spec["hp"] = json.loads(overrides[name])
        res = run_case(name, spec, args.steps, args.probe_every, tuple(args.tolerances.split(",")), problem=args.problem,
                       derivatives=tuple(args.derivatives.split(",")))
        d = res["discrete"]
        print(f"{name:15s} discrete catapults {d['catapults']}, sharpness max {d['sharpness_max']:.1f}, "
              f"threshold {d['threshold']:.1f}")
        for key, q in res["ratios"].items():
            print(f"{'':15s} {key}: solver steps x{q['solver_steps_per_step']:.2f}, evaluation x{q['eval_time']:.2f}, "
                  f"run time per step x{q['run_time_per_step']:.2f}")
        results.append(res)
    factors = _linear_factors()
    print("linear r-mode factor per step (GD, eps = eta lambda - 2): exact 1+eps, exp(eps), exp(eps - eps^2/2)")
    for r in factors:
        print(f"  eps {r['eps']:4.2f}: exact {r['exact']:.4f}  first {r['first_order']:.4f} ({r['first_error']:+.2e})  "
              f"second {r['second_order']:.4f} ({r['second_error']:+.2e})")
    out = {
        "description": __doc__.split("\n\n")[0],
        "platform": {"machine": platform.machine(), "processor": platform.processor(), "jax": jax.__version__,
                     "backend": jax.default_backend(), "cpus": jax.local_device_count()},
        "problem": args.problem,
        "probe_every": args.probe_every,
        "tolerances": {k: list(v) for k, v in TOLERANCES.items()},
        "linear_r_mode_factors": factors,
        "results": results,
        "total_wall_s": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), out)
    print(f"wrote {args.out} ({out['total_wall_s']:.0f} s)")



if __name__ == "__main__":
    main()
