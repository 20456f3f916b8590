"""One prepared accelerator run: per-step cost, a 1,024-configuration sweep, the fidelity grid,
and whether diffrax's step counts survive vmap, in float32 and float64, in one call.

Meant for a single GPU in under 8 minutes (``--budget-s``, default 420: each section stops
starting new work once its share of the budget is spent, and says what it skipped); ``--tiny``
shrinks everything for a CPU check (61 s on 2 busy cores). Sections, in this order, each in
every precision (``--dtypes``, default both):

1. the vmapped sweep: ``--lrs x --seeds`` configurations (default 256 x 4 = 1,024) of GD on
   ``--problem`` (default mlp-digits), models discrete + rod, through
   ``rodflow_jax.experiments.sweep(devices="all")``, first call (compile) and second call; against
   a Python loop of batch-1 sweeps over ``--loop-configs`` of the same configurations (the first
   compiles; the rest give the time per configuration, extrapolated to the whole grid);
2. the step-count check (diffrax issues #213 and #692 report adaptive step counts diverging under
   vmap on GPUs): the rod flow's ``solver_steps`` of each looped configuration run alone against
   the same configuration inside the vmapped batch (the same probe grid: the loop's parameter
   budget is divided by the batch size), max absolute and relative difference;
3. the rollout kernel alone (the discrete optimizer, the same configurations): one ``vmap``,
   ``jax.lax.map`` with ``--map-batch-size`` (configurations vmapped that many at a time, for
   memory), and a Python loop over ``--loop-configs`` configurations (extrapolated), each with its
   peak memory;
4. per-step cost at three sizes of the tanh MLP (``--sizes``), reusing ``scaling.py``;
5. the fidelity grid (``--fidelity``: default the CI grid of ``fidelity.py --quick``: mlp-digits
   x gd, heavy_ball, rmsprop, adam, 600 steps, pre-edge start) with ``--fidelity-jobs`` worker
   processes sharing the device. The cells are ``fidelity.py``'s own (``fidelity._cell_task``, what
   its ``--jobs`` workers run); they run here, not through its CLI, because ``fidelity.py`` fixes
   float64 when it is imported, and its workers re-import it.

Writes JSON (``--out``, default ``benchmarks/results/accelerator.json``) after every section.

    python benchmarks/accelerator.py                          # on the GPU machine
    python benchmarks/accelerator.py --tiny --out /tmp/accelerator_tiny.json   # CPU check
"""

from __future__ import annotations

import os

# before JAX starts: the fidelity workers share the device with this process
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scaling, fidelity

import scaling  # noqa: E402
from rodflow_jax import make_optimizer, sweep  # noqa: E402
from rodflow_jax._discrete import init_carry, rollout_chunk  # noqa: E402
from rodflow_jax.experiments import rollout_batch, stack_trees, write_json  # noqa: E402
from rodflow_jax.problems import get_problem  # noqa: E402

OUT = Path(__file__).parent / "results" / "accelerator.json"
QUICK_FIDELITY = "mlp-digits:gd,heavy_ball,rmsprop,adam"
# the share of --budget-s by which each section must have finished starting new work
SECTION_END = {"sweep": 0.40, "rollout_kernel": 0.50, "per_step": 0.72, "fidelity": 1.0}


class Budget:
    def __init__(self, total_s: float):
        self.t0, self.total = time.perf_counter(), total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self, section: str) -> float:
        return SECTION_END[section] * self.total - self.elapsed()


def set_precision(dtype: str) -> None:
    jax.config.update("jax_enable_x64", dtype == "float64")


def grid_for(prob, lrs: int) -> list[float]:
    lr0 = prob.learning_rates["gd"]
    return [float(x) for x in np.geomspace(0.25 * lr0, 2.0 * lr0, lrs)]


def loop_indices(num: int, total: int) -> list[int]:
    """``num`` configurations spread over the grid (the ends included)."""
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, min(num, total))})


# --- 1 and 2: the sweep, the loop, the step counts ----------------------------------------------
def sweep_section(problem: str, lrs: int, seeds: int, steps: int, loop_configs: int, budget: Budget,
                  tolerance: float) -> tuple[dict, dict]:
    prob = get_problem(problem)
    made = functools.lru_cache(prob.make)

    @functools.lru_cache
    def make(seed):  # one loss_fn object for every seed (the data do not depend on it): one compilation
        return made(0)[0], made(seed)[1]
    grid = grid_for(prob, lrs)
    seed_list = list(range(seeds))
    models = ["discrete", "rod"]
    B = lrs * seeds
    # one vmapped call a device (the sweep's default on an accelerator is calls of 128)
    kw = dict(models=models, devices="all", batch_size=-(-B // jax.device_count()))
    calls = []
    for _ in range(2):
        with scaling.Peak() as pk:
            t = time.perf_counter()
            res = sweep(make, "gd", {"learning_rate": grid}, seed_list, steps, **kw)
            wall = time.perf_counter() - t
        calls.append((wall, pk.mb))
    batched = {(r["hyperparameters"]["learning_rate"], r["seed"]): r for r in res.records}
    configs = list(batched)
    out = {"problem": problem, "num_configurations": B, "steps": steps, "models": models,
           "vmapped": {"first_call_s": calls[0][0], "second_call_s": calls[1][0], "peak_mb_first_call": calls[0][1],
                       "peak_mb": calls[1][1], "timings": res.timings,
                       "per_configuration_s": calls[1][0] / B},
           "diverged": sum(bool(r["discrete"]["diverged"]) for r in res.records),
           "rod_failed": sum(bool(r.get("rod", {}).get("failed", False)) for r in res.records)}
    loop, checks = [], []
    for i in loop_indices(loop_configs, B):
        if loop and budget.left("sweep") < 0:
            out["loop_stopped"] = f"budget: {len(loop)} of {min(loop_configs, B)} configurations"
            break
        lr, seed = configs[i]
        t = time.perf_counter()
        one = sweep(make, "gd", {"learning_rate": [lr]}, [seed], steps, param_budget=2e7 / B, **kw)
        loop.append(time.perf_counter() - t)
        a, b = one.records[0]["rod"]["solver_steps"], batched[(lr, seed)]["rod"]["solver_steps"]
        checks.append({"configuration": i, "learning_rate": lr, "seed": seed, "rod_solver_steps_alone": a,
                       "rod_solver_steps_batched": b,
                       "rejected_alone": one.records[0]["rod"]["rejected_steps"],
                       "rejected_batched": batched[(lr, seed)]["rod"]["rejected_steps"]})
    per = float(np.mean(loop[1:])) if len(loop) > 1 else (loop[0] if loop else None)
    out["loop"] = {"configurations": len(loop), "first_call_s": loop[0] if loop else None,
                   "per_configuration_s": per, "calls_s": loop,
                   "extrapolated_all_s": (loop[0] + per * (B - 1)) if loop else None}
    if per:
        out["vmap_speedup_per_configuration"] = per / out["vmapped"]["per_configuration_s"]
    diff = [abs(c["rod_solver_steps_alone"] - c["rod_solver_steps_batched"]) for c in checks]
    rel = [d / max(c["rod_solver_steps_alone"], 1) for d, c in zip(diff, checks)]
    check = {"flow": "rod", "configurations": len(checks), "identical": sum(d == 0 for d in diff),
             "max_abs_diff": max(diff) if diff else None, "max_rel_diff": max(rel) if rel else None,
             "tolerance_rel": tolerance, "passed": bool(checks) and max(rel) <= tolerance, "per_configuration": checks}
    return out, check


# --- 3: the rollout kernel: vmap, lax.map(batch_size), a loop -----------------------------------
def rollout_section(problem: str, lrs: int, seeds: int, steps: int, loop_configs: int, map_batch: int,
                    budget: Budget) -> dict:
    prob = get_problem(problem)
    loss_fn, _ = prob.make(0)
    grid = grid_for(prob, lrs)
    params = stack_trees([prob.make(s)[1] for s in range(seeds)] * lrs)  # lr-major, like the sweep
    opt = stack_trees([make_optimizer("gd", learning_rate=lr) for lr in grid for _ in range(seeds)])
    dtype = jnp.result_type(*jax.tree.leaves(params))
    opt = jax.tree.map(lambda x: jnp.asarray(x, dtype) if hasattr(x, "dtype") else x, opt)
    B = lrs * seeds
    ks = jnp.arange(steps + 1)

    def one(o, p):
        carry = init_carry(o, loss_fn, p)
        return rollout_chunk(o, loss_fn, carry, ks, steps, None)[1].loss  # (steps + 1,)

    vm = jax.jit(jax.vmap(one))
    lm = jax.jit(lambda o, p: jax.lax.map(lambda a: one(*a), (o, p), batch_size=min(map_batch, B)))
    single = jax.jit(one)
    out = {"num_configurations": B, "steps": steps, "map_batch_size": min(map_batch, B)}
    ref = None
    for name, fn in (("vmap", lambda: vm(opt, params)), ("lax_map", lambda: lm(opt, params)),
                     ("engine_rollout_batch", lambda: rollout_batch(opt, params, loss_fn, steps, [0]).loss)):
        if budget.left("rollout_kernel") < 0:
            out.setdefault("skipped", []).append(f"{name}: budget")
            continue
        rec = scaling.twice(fn)
        loss = np.asarray(rec.pop("out"))
        ref = loss if ref is None else ref
        rec["per_configuration_s"] = rec["run_s"] / B
        rec["max_abs_loss_diff_vs_vmap"] = float(np.nanmax(np.abs(loss - ref)))
        out[name] = rec
    loop = []
    for i in loop_indices(loop_configs, B):
        if loop and budget.left("rollout_kernel") < 0:
            break
        o, p = jax.tree.map(lambda x: x[i] if hasattr(x, "shape") and x.ndim else x, (opt, params))
        t = time.perf_counter()
        jax.block_until_ready(single(o, p))
        loop.append(time.perf_counter() - t)
    per = float(np.mean(loop[1:])) if len(loop) > 1 else (loop[0] if loop else None)
    out["loop"] = {"configurations": len(loop), "first_call_s": loop[0] if loop else None,
                   "per_configuration_s": per, "extrapolated_all_s": (loop[0] + per * (B - 1)) if loop else None}
    for name in ("vmap", "lax_map", "engine_rollout_batch"):
        if per and name in out:
            out[name]["speedup_over_loop"] = per / out[name]["per_configuration_s"]
    return out


# --- 5: fidelity cells in worker processes, in either precision -------------------------------
def fidelity_cell(dtype, pname, name, kw):
    """One fidelity cell (``fidelity._cell_task``) in ``dtype``; runs in a worker process."""
    import fidelity  # sets float64 on import: set the precision after it

    set_precision(dtype)
    pname, name, _, rows, _, wall = fidelity._cell_task(pname, name, **kw, keep=None)
    for r in rows:
        r["dtype"] = str(jnp.result_type(*jax.tree.leaves(fidelity.rf.get_problem(pname).make(0)[1])))
    return pname, name, rows, wall


def fidelity_section(dtype: str, spec: str, steps: int, starts, jobs: int, budget: Budget) -> dict:
    import concurrent.futures as cf
    import multiprocessing as mp

    cells = [(p, o) for part in spec.split(";") for p in [part.split(":")[0]] for o in part.split(":")[1].split(",")]
    kw = dict(steps=steps, momentum=None, starts=tuple(starts), models=("discrete", "stable", "rod"), progress=False,
              probe_every=None)
    t = time.perf_counter()
    rows, walls, skipped = [], {}, []
    if jobs == 1:
        for p, o in cells:
            if budget.left("fidelity") < 0:
                skipped.append(f"{p}:{o}")
                continue
            _, _, r, w = fidelity_cell(dtype, p, o, kw)
            rows += r
            walls[f"{p}:{o}"] = w
        set_precision(dtype)  # the cell's import of fidelity set float64
    else:
        pool = cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))
        futures = {pool.submit(fidelity_cell, dtype, p, o, kw): f"{p}:{o}" for p, o in cells}
        done, pending = cf.wait(futures, timeout=max(budget.left("fidelity"), 1.0))
        for f in done:
            _, _, r, w = f.result()
            rows += r
            walls[futures[f]] = w
        skipped = [futures[f] for f in pending]
        if pending:  # out of budget: stop the workers this section started
            procs = list((getattr(pool, "_processes", None) or {}).values())
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.join(10)
        pool.shutdown(wait=not pending, cancel_futures=True)
    import fidelity

    set_precision(dtype)
    return {"cells": [f"{p}:{o}" for p, o in cells], "steps": steps, "starts": list(starts), "jobs": jobs,
            "wall_s": time.perf_counter() - t, "cell_wall_s": walls, "skipped_for_budget": skipped,
            "table": fidelity.markdown_table(rows) if rows else "", "rows": rows}


# --- driver -------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a CPU check: toy problem, 4 configurations, few steps, "
                    "one small MLP, a one-cell fidelity grid, float32")
    ap.add_argument("--dtypes", default=None, help="default float32,float64 (--tiny: float32)")
    ap.add_argument("--problem", default=None, help="sweep problem (default mlp-digits; --tiny: toy)")
    ap.add_argument("--lrs", type=int, default=None, help="learning rates in the sweep (default 256)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds in the sweep (default 4)")
    ap.add_argument("--steps", type=int, default=None, help="steps per sweep configuration (default 100)")
    ap.add_argument("--loop-configs", type=int, default=None, help="configurations run one at a time (default 6)")
    ap.add_argument("--map-batch-size", type=int, default=128)
    ap.add_argument("--sizes", default=None, help="MLP sizes for the per-step cost (default 2.4k,100k,1M)")
    ap.add_argument("--scaling-steps", type=int, default=None, help="simulated steps per per-step measurement (default 20)")
    ap.add_argument("--fidelity", default=None, help=f"PROBLEM:OPT,OPT[;...] (default {QUICK_FIDELITY}; "
                    "'none' skips it)")
    ap.add_argument("--fidelity-steps", type=int, default=None, help="default 600")
    ap.add_argument("--fidelity-starts", default=None, help="default pre_edge (--tiny: default)")
    ap.add_argument("--fidelity-jobs", type=int, default=None, help="worker processes (default 4; --tiny: 1)")
    # 1 %: since stop 34 a float64 rod is seeded by the measured rounding of its own arithmetic, which
    # batching can change (summation order), so alone and in a batch it may take slightly different
    # steps; the GPU divergence this check is for (diffrax #213, #692) is far larger
    ap.add_argument("--tolerance", type=float, default=0.01, help="max relative step-count difference that passes")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-time budget (default 420; --tiny: 300)")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    tiny = a.tiny
    pick = lambda v, full, small: v if v is not None else (small if tiny else full)  # noqa: E731
    dtypes = pick(a.dtypes, "float32,float64", "float32").split(",")
    problem = pick(a.problem, "mlp-digits", "toy")
    lrs, seeds = pick(a.lrs, 256, 2), pick(a.seeds, 4, 2)
    steps, loop_configs = pick(a.steps, 100, 12), pick(a.loop_configs, 6, 4)
    sizes = pick(a.sizes, "2.4k,100k,1M", "2.4k")
    scaling_steps = pick(a.scaling_steps, 20, 6)
    fid = pick(a.fidelity, QUICK_FIDELITY, "toy:gd")
    fid_steps = pick(a.fidelity_steps, 600, 40)
    fid_starts = pick(a.fidelity_starts, "pre_edge", "default").split(",")
    fid_jobs = pick(a.fidelity_jobs, 4, 1)
    budget = Budget(pick(a.budget_s, 420.0, 300.0))
    scaling_models = scaling.MODELS if not tiny else ("discrete", "rod", "probe")

    info = scaling.machine()
    print(f"jax.devices(): {jax.devices()}", flush=True)
    print(f"device_kind: {jax.devices()[0].device_kind}; backend {jax.default_backend()}; "
          f"{info['cpu_count']} CPUs; {info['platform']}", flush=True)
    out = {"description": __doc__.split("\n\n")[0], "machine": info, "memory_method": scaling.memory_method(),
           "settings": {"tiny": tiny, "dtypes": dtypes, "problem": problem, "lrs": lrs, "seeds": seeds, "steps": steps,
                        "loop_configs": loop_configs, "map_batch_size": a.map_batch_size, "sizes": sizes,
                        "scaling_steps": scaling_steps, "fidelity": fid, "fidelity_steps": fid_steps,
                        "fidelity_starts": fid_starts, "fidelity_jobs": fid_jobs, "budget_s": budget.total},
           "sweep": {}, "step_count_check": {}, "rollout_kernel": {}, "per_step": {"rows": []}, "fidelity": {},
           "skipped": []}
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out["total_wall_s"] = budget.elapsed()
        write_json(path, out)

    for dtype in dtypes:  # 1 + 2
        if budget.left("sweep") < 0:
            out["skipped"].append(f"sweep {dtype}: budget")
            continue
        set_precision(dtype)
        s, c = sweep_section(problem, lrs, seeds, steps, loop_configs, budget, a.tolerance)
        out["sweep"][dtype], out["step_count_check"][dtype] = s, c
        print(f"[{budget.elapsed():.0f} s] sweep {dtype}: {s['num_configurations']} configurations x {steps} steps: "
              f"vmapped {s['vmapped']['first_call_s']:.1f} s first, {s['vmapped']['second_call_s']:.2f} s second; "
              f"loop {s['loop']['per_configuration_s']:.3f} s per configuration "
              f"(all: {s['loop']['extrapolated_all_s']:.1f} s extrapolated); "
              f"vmap {s.get('vmap_speedup_per_configuration', float('nan')):.1f}x per configuration", flush=True)
        print(f"    step counts ({c['configurations']} configurations alone vs in the batch): {c['identical']} identical, "
              f"max diff {c['max_abs_diff']} ({c['max_rel_diff']:.3g} relative): "
              f"{'passed' if c['passed'] else 'FAILED'}", flush=True)
        save()
    for dtype in dtypes:  # 3
        if budget.left("rollout_kernel") < 0:
            out["skipped"].append(f"rollout kernel {dtype}: budget")
            continue
        set_precision(dtype)
        r = rollout_section(problem, lrs, seeds, steps, loop_configs, a.map_batch_size, budget)
        out["rollout_kernel"][dtype] = r
        print(f"[{budget.elapsed():.0f} s] rollout kernel {dtype}, {r['num_configurations']} configurations: " + "; ".join(
            f"{k} {r[k]['run_s']:.3g} s ({r[k]['peak_mb']:.0f} MB)" for k in ("vmap", "lax_map", "engine_rollout_batch")
            if k in r) + f"; loop {r['loop']['per_configuration_s']:.3g} s per configuration", flush=True)
        save()
    lr_cache = {}
    models = scaling.models_for(["mlp"], [scaling.parse_size(x) for x in sizes.split(",")], None)
    for dtype in dtypes:  # 4
        for m in models:
            if budget.left("per_step") < 0:
                out["skipped"].append(f"per-step {m.label} {dtype}: budget")
                continue
            row = scaling.run_one(m, dtype, scaling_steps, lr_cache, scaling_models)
            out["per_step"]["rows"].append(row)
            print(f"[{budget.elapsed():.0f} s] " + scaling.table([row]).splitlines()[-1], flush=True)
            save()
    out["per_step"]["slopes"] = scaling.fit_slopes(out["per_step"]["rows"])
    save()
    if fid != "none":
        for dtype in dtypes:  # 5
            if budget.left("fidelity") < 0:
                out["skipped"].append(f"fidelity {dtype}: budget")
                continue
            f = fidelity_section(dtype, fid, fid_steps, fid_starts, fid_jobs, budget)
            out["fidelity"][dtype] = f
            print(f"[{budget.elapsed():.0f} s] fidelity {dtype}: {len(f['cell_wall_s'])} cells in {f['wall_s']:.0f} s "
                  f"({fid_jobs} job(s))" + (f"; skipped {f['skipped_for_budget']}" if f["skipped_for_budget"] else ""),
                  flush=True)
            if f["table"]:
                print(f["table"], flush=True)
            save()
    checks = out["step_count_check"]
    out["step_count_check_passed"] = bool(checks) and all(c["passed"] for c in checks.values())
    save()
    print(f"total {budget.elapsed():.0f} s; step-count check {'passed' if out['step_count_check_passed'] else 'FAILED'}; "
          f"skipped: {out['skipped'] or 'nothing'}; wrote {path}")
    return out


if __name__ == "__main__":
    main()
