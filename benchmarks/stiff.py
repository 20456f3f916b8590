"""Stiff stable flows: the explicit solver they had against the matrix-free implicit one they get.

For each adaptive optimizer (and a wrapped ``optax.adam``) on each problem, at the problem's
default learning rate, the stable flow is integrated from the default start step K to N - 1 (what
``compare`` integrates) three times, float64:

* ``before``: Tsit5, rtol 1e-7 / atol 1e-9, 128 solver steps per simulated step (the old default);
* ``after``: the new default, :func:`rodflow_jax._integrate.stiff_solver` (Kvaerno5 with a
  Newton-Krylov stage solver on Jacobian-vector products, 64 per step; at rtol 1e-6 / atol 1e-8
  since stop 31, the same tolerances as ``before`` in ``stiff.json``); ``after@RTOL``: it at
  rtol ``RTOL``, atol ``RTOL / 100``;
* ``ref``: the implicit solver at rtol 1e-9 / atol 1e-11 (``--ref-rtol``), the accuracy reference.

Reported per simulated step: solver steps (accepted + rejected), vector-field evaluations (one
gradient each), Jacobian-vector products (one Hessian-vector product each; counted by host
callbacks in a separate run), "grad-eq" = VF + JVP x (measured JVP/VF wall-time ratio), compiled
wall time, and the failure reason; and the centre's distance from the reference relative to the
path length |ref(k) - ref(K)| (final and max over the last 90 %).

    python benchmarks/stiff.py --out benchmarks/results/stiff.json
    python benchmarks/stiff.py --parts before --problems mlp-digits   # one part; rows are merged
    python benchmarks/stiff.py --parts after@1e-5,ref   # the stiff solver at rtol 1e-5 / atol 1e-7
    python benchmarks/stiff.py --fidelity benchmarks/results/fidelity.json  # the grid's failed stable flows
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import rodflow_jax as rf  # noqa: E402
from rodflow_jax import _integrate as I  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402

NAMES = ["rmsprop", "scalar_rmsprop", "adam", "scalar_adam", "nadam", "scalar_nadam", "optax:adam"]
TSIT5_EVALS = 6  # first-same-as-last: six new stages per attempted step

COUNT = {"vf": 0, "jvp": 0, "solves": 0}


def _count_vf():
    COUNT["vf"] += 1


def _count_solve(k):
    COUNT["jvp"] += int(k)
    COUNT["solves"] += 1


class CountingStableFlow(rf.StableFlow):
    def vector_field(self, t, y, args):
        jax.debug.callback(_count_vf)
        return super().vector_field(t, y, args)


class CountingGMRES(I.KrylovGMRES):
    def compute(self, state, vector, options):
        x, result, stats = super().compute(state, vector, options)
        jax.debug.callback(_count_solve, stats["num_steps"])
        return x, result, stats


def _counting(config):
    lin = config.solver.root_finder.linear_solver
    solver = eqx.tree_at(lambda s: s.root_finder.linear_solver, config.solver,
                           CountingGMRES(lin.rtol, lin.atol, lin.max_steps))
    return dataclasses.replace(config, solver=solver)  # the controller, budget and min step kept


def _optimizer(prob, name):
    if name == "optax:adam":
        hp = {"learning_rate": prob.learning_rates["adam"], **prob.hyperparameters.get("adam", {})}
        return rf.from_optax(optax.adam, name="optax:adam", hyperparameters=hp)
    return rf.make_optimizer(name, learning_rate=prob.learning_rates[name], **prob.hyperparameters.get(name, {}))


def _rows(tree):
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], axis=1)


def _jvp_ratio(flow, y0, reps=30):
    """Wall time of one JVP of the linearised vector field over one vector-field evaluation."""
    vf = jax.jit(lambda y: flow.vector_field(0.0, y, None))
    _, lin = jax.linearize(lambda y: flow.vector_field(0.0, y, None), y0)
    lin = jax.jit(lin)

    def clock(f):  # best of 5 rounds (the machine is shared)
        jax.block_until_ready(f(y0))
        best = np.inf
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(reps):
                r = f(y0)
            jax.block_until_ready(r)
            best = min(best, (time.perf_counter() - t) / reps)
        return best

    return clock(lin) / clock(vf)


def _solve(flow, y0, ts, config, count: bool):
    """(Solution, compile s, run s, counts)."""
    if count:
        flow = CountingStableFlow(flow.optimizer, flow.loss_fn, flow.scale)
        config = _counting(config)
    t = time.perf_counter()
    compiled = I._solve_jit.lower(flow, y0, ts, ts, config, False).compile()
    tc = time.perf_counter() - t
    walls = []
    while not walls or (not count and len(walls) < 3 and sum(walls) < 20):  # best of up to 3 (a shared machine)
        for k in COUNT:
            COUNT[k] = 0
        t = time.perf_counter()
        sol = jax.block_until_ready(compiled(flow, y0, ts, ts, config, False))
        walls.append(time.perf_counter() - t)
    return sol, tc, min(walls), dict(COUNT)


def _at_tolerance(config, part):
    """``after@RTOL``: the default stiff solver at rtol ``RTOL``, atol ``RTOL / 100`` (the
    defaults' ratio)."""
    name, _, rtol = part.partition("@")
    if name != "after" or not rtol:
        raise SystemExit(f"unknown part {part!r}: before, after, ref or after@RTOL")
    return dataclasses.replace(config, rtol=float(rtol), atol=float(rtol) / 100)


def _part_order(part):
    """before, after, after@RTOL by decreasing RTOL, ref."""
    name, _, rtol = part.partition("@")
    return (["before", "after", "ref"].index(name), -float(rtol or "inf"))


def run_cell(prob, name, steps, parts, ref_rtol, cache: Path):
    loss_fn, params0 = prob.make(0)
    opt = _optimizer(prob, name).prepared(params0)
    K = rf.default_start_step(opt)
    disc = rf.run_discrete(opt, loss_fn, params0, K + 1, save_steps=[K, K + 1])
    (z0, s0), (_, s1) = disc.state_at(K), disc.state_at(K + 1)
    flow, y0 = rf.stable_flow(opt, loss_fn, z0, s0, s1)
    ts = jnp.arange(K, steps, dtype=jnp.float64)  # compare's flow steps K .. N - 1
    ratio = _jvp_ratio(flow, y0)
    configs = {
        "before": I.SolverConfig(diffrax.Tsit5(), 1e-7, 1e-9, 128),
        "after": I.stiff_solver(jnp.float64),
        "ref": I.SolverConfig(I.implicit_solver(), ref_rtol, ref_rtol * 1e-2, 256),
    }
    out = []
    for part in parts:
        cfg = configs[part] if part in configs else _at_tolerance(configs["after"], part)
        implicit = I.is_implicit(cfg)
        sol, tc, wall, counts = _solve(flow, y0, ts, cfg, count=False)
        if implicit and part.startswith("after"):
            _, _, _, counts = _solve(flow, y0, ts, cfg, count=True)
        else:
            counts = {"vf": TSIT5_EVALS * int(sol.num_steps), "jvp": 0, "solves": 0} if not implicit else None
        loss = np.asarray(sol.loss)
        finite = np.isfinite(loss)
        msg = I.result_message(int(sol.result))
        failed = bool(msg or not finite.all())
        reached = int(np.asarray(ts)[finite][-1]) if finite.any() else K
        row = {
            "problem": prob.name, "optimizer": name, "part": part, "solver": I.solver_name(cfg),
            "rtol": cfg.rtol, "atol": cfg.atol, "start_step": K, "num_steps": steps,
            "failed": failed, "message": msg or ("non-finite state" if failed else ""),
            "failed_at": reached if failed else None,
            "solver_steps": int(sol.num_steps), "rejected_steps": int(sol.num_rejected_steps),
            "simulated_steps": max(reached - K, 1), "compile_s": tc, "wall_s": wall,
            "jvp_over_vf_time": ratio,
        }
        m = row["simulated_steps"]
        row["solver_steps_per_step"] = row["solver_steps"] / m
        row["wall_ms_per_step"] = 1e3 * wall / m
        if counts is not None:
            row.update(vf_per_step=counts["vf"] / m, jvp_per_step=counts["jvp"] / m,
                       linear_solves_per_step=counts["solves"] / m,
                       grad_eq_per_step=(counts["vf"] + ratio * counts["jvp"]) / m)
        np.save(cache / f"{prob.name}_{name}_{part}.npy".replace(":", "_"), _rows(sol.centre))
        out.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return out


def distances(rows, cache):
    """Each row's centre against its cell's reference (saved centres in ``cache``)."""
    for row in rows:
        load = lambda part: np.load(cache / f"{row['problem']}_{row['optimizer']}_{part}.npy".replace(":", "_"))  # noqa: E731
        try:
            ref, c = load("ref"), load(row["part"])
        except FileNotFoundError:
            continue
        if row["part"] == "ref":
            continue
        scale = np.linalg.norm(ref - ref[0], axis=1)
        late = np.arange(len(ref)) >= (len(ref) - 1) // 10  # the last 90 %, as the records' _max
        with np.errstate(invalid="ignore", divide="ignore"):
            err = np.linalg.norm(c - ref, axis=1) / scale
        ok = np.isfinite(err) & late
        row["dist_to_ref_final"] = float(err[ok][-1]) if ok.any() else None  # (a failed solve: where it stopped)
        row["dist_to_ref_max"] = float(np.max(err[ok])) if ok.any() else None


def fidelity_failures(path, cache: Path):
    """Every stable flow that failed in a fidelity-grid run (``benchmarks/fidelity.py`` rows),
    solved again from the same start step with the new default solver."""
    out = []
    for r in json.loads(Path(path).read_text()):
        if r.get("stable_failed_at") is None and not r.get("stable_message"):
            continue
        prob = rf.get_problem(r["problem"])
        loss_fn, params0 = prob.make(0)
        opt = _optimizer(prob, r["optimizer"]).prepared(params0)
        K, N = r["start_step"], r["num_steps"]
        disc = rf.run_discrete(opt, loss_fn, params0, K + 1, save_steps=[K, K + 1])
        (z0, s0), (_, s1) = disc.state_at(K), disc.state_at(K + 1)
        flow, y0 = rf.stable_flow(opt, loss_fn, z0, s0, s1)
        t = time.perf_counter()
        run = rf.integrate(flow, y0, K, N - 1)
        row = {"problem": r["problem"], "optimizer": r["optimizer"], "start": r["start"], "start_step": K,
               "num_steps": N, "before_failed_at": r["stable_failed_at"], "before_message": r["stable_message"],
               "before_solver_steps": r["stable_solver_steps"], "solver": I.solver_name(I.default_solver(flow, jnp.float64)),
               "failed": run.failed, "failed_at": run.failed_at, "message": run.message,
               "solver_steps": run.solver_steps, "rejected_steps": run.rejected_steps,
               "wall_s_with_compile": time.perf_counter() - t}
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def table(rows):
    lines = ["| problem | optimizer | K | solver | rtol | failed | solver steps / step | VF / step | JVP / step | "
             "grad-eq / step | ms / step | dist. to ref final / max |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["part"] == "ref":
            continue
        f = lambda k, fmt="{:.1f}": "-" if r.get(k) is None else fmt.format(r[k])  # noqa: E731
        fail = f"@{r['failed_at']} ({r['message']})" if r["failed"] else "-"
        lines.append(f"| {r['problem']} | {r['optimizer']} | {r['start_step']} | {r['solver']} | {r['rtol']:.0e} | {fail} | "
                     f"{f('solver_steps_per_step', '{:.2f}')} | {f('vf_per_step')} | {f('jvp_per_step')} | "
                     f"{f('grad_eq_per_step')} | {f('wall_ms_per_step')} | "
                     f"{f('dist_to_ref_final', '{:.1e}')} / {f('dist_to_ref_max', '{:.1e}')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="mlp-digits,deep-linear")
    ap.add_argument("--optimizers", default=",".join(NAMES))
    ap.add_argument("--parts", default="before,after,ref")
    ap.add_argument("--steps", default="", help="per-problem step counts, e.g. mlp-digits=600 (default: the problem's)")
    ap.add_argument("--ref-rtol", type=float, default=1e-9)
    ap.add_argument("--out", default="benchmarks/results/stiff.json")
    ap.add_argument("--cache", default="/tmp/rodflow_stiff_cache", help="where each solve's centres are kept (npy)")
    ap.add_argument("--fidelity", default="", help="a fidelity.json: re-solve its failed stable flows with the new default")
    args = ap.parse_args()
    steps = dict(kv.split("=") for kv in args.steps.split(",") if kv)
    parts = args.parts.split(",")
    out = Path(args.out)
    old = json.loads(out.read_text()).get("rows", []) if out.exists() else []
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    key = lambda r: (r["problem"], r["optimizer"], r["part"])  # noqa: E731
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    machine = f"{platform.machine()} {os.cpu_count()} CPUs (shared), jax {jax.__version__}"
    if args.fidelity:
        rows = fidelity_failures(args.fidelity, Path(args.cache))
        print("| problem | optimizer | start | K | before (Tsit5) | after | solver steps before / after |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            after = f"failed @{r['failed_at']} ({r['message']})" if r["failed"] else "ok"
            print(f"| {r['problem']} | {r['optimizer']} | {r['start']} | {r['start_step']} | failed @{r['before_failed_at']} "
                  f"({r['before_message']}) | {after} | {r['before_solver_steps']} / {r['solver_steps']} |")
        write_json(out, {**previous, "machine": machine, "fidelity_failures": rows})
        return
    t0 = time.perf_counter()
    rows = []
    for pname in args.problems.split(","):
        prob = rf.get_problem(pname)
        for name in args.optimizers.split(","):
            rows += run_cell(prob, name, int(steps.get(pname, prob.default_steps)), parts, args.ref_rtol, cache)
            new = {key(r) for r in rows}
            merged = [r for r in old if key(r) not in new] + rows
            distances(merged, cache)
            merged.sort(key=lambda r: (r["problem"], NAMES.index(r["optimizer"]) if r["optimizer"] in NAMES else 99,
                                       _part_order(r["part"])))
            write_json(out, {**previous, "machine": machine, "rows": merged})  # after every cell: an interrupted run keeps it
    print(table(merged))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
