"""A sweep's batch size: its cost, and whether its layouts (whole, job-array shards) agree.

``rodflow sweep`` computes its configurations in calls of ``--batch-size`` rows a device (the
engine's row blocks). For each batch size this runs the same sweep twice (the first call
compiles, the second is the run's cost) and, for the sizes in ``--check``, also as ``--shard
I/N`` slices for every N in ``--shards``, joined in memory as ``rodflow merge`` joins them, and
compares every array and every record with the whole sweep bit for bit. ``all`` is one call of
every configuration (the layout before stop 38).

    python benchmarks/sweep_layouts.py --problem mlp-digits --optimizer gd --learning-rate 0.1:0.4:8 --seeds 2 \\
        --steps 300 --out benchmarks/results/sweep_layouts_mlp.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from rodflow_jax.experiments import sweep, values_from_range, write_json
from rodflow_jax.experiments._spec import resolve_problem


def _steps(records, model):
    return [r.get(model, {}).get("solver_steps") for r in records]


def _differences(whole, parts, models) -> dict:
    """Where the joined shards differ from the whole sweep: each array's largest difference (0:
    bit for bit) and the configurations whose solver step counts differ."""
    out = {}
    for k, a in whole.arrays.items():
        b = a if k == "probe_steps" else np.concatenate([p.arrays[k] for p in parts])
        same = np.array_equal(a, b, equal_nan=True)
        out[k] = 0.0 if same else float(np.nanmax(np.abs(a - b)))
    records = [r for p in parts for r in p.records]
    out["records_identical"] = json.dumps(whole.records, sort_keys=True, default=str) == json.dumps(
        records, sort_keys=True, default=str)
    out["solver_steps_differ"] = {m: int(sum(x != y for x, y in zip(_steps(whole.records, m), _steps(records, m))))
                                  for m in models if m != "discrete"}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", default="mlp-digits")
    ap.add_argument("--optimizer", default="gd")
    ap.add_argument("--learning-rate", default=None, help="A:B:N[:log] or v1,v2,... (default: the problem's)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--models", default="discrete,stable,rod")
    ap.add_argument("--batch-sizes", default="2,all")
    ap.add_argument("--check", default="2,all", help="batch sizes whose layouts are compared")
    ap.add_argument("--shards", default="2,3")
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/sweep_layouts.json")
    a = ap.parse_args()
    if a.float64:
        jax.config.update("jax_enable_x64", True)
    spec = resolve_problem(a.problem, a.optimizer)
    make = spec.make
    loss0 = make(0)[0]

    def one_loss(seed):  # one loss_fn object for every seed: the second call reuses the compilation
        return loss0, make(seed)[1]

    grid = {"learning_rate": values_from_range(a.learning_rate)} if a.learning_rate else {}
    seeds = list(range(a.seeds))
    models = a.models.split(",")
    B = len(seeds) * (len(grid["learning_rate"]) if grid else 1)
    kw = dict(models=models)
    out = {"device": str(jax.devices()[0]), "machine": platform.platform(), "problem": a.problem,
           "optimizer": a.optimizer, "num_configurations": B, "steps": a.steps, "models": models,
           "dtype": "float64" if a.float64 else "float32", "runs": []}
    print(f"{a.problem}, {a.optimizer}: {B} configurations x {a.steps} steps, models {a.models}, {out['dtype']}")
    print(f"{'batch size':>10s} {'first call s':>13s} {'run s':>8s}  layouts (shards {a.shards})")
    one_call = None
    for size in a.batch_sizes.split(","):
        bs = B if size == "all" else int(size)
        calls = []
        for _ in range(2):
            t = time.perf_counter()
            whole = sweep(one_loss, a.optimizer, grid, seeds, a.steps, batch_size=bs, **kw)
            calls.append(time.perf_counter() - t)
        run = {"batch_size": size, "first_call_s": calls[0], "run_s": calls[1], "timings": whole.timings,
               "solver_steps": {m: _steps(whole.records, m) for m in models if m != "discrete"}}
        if size in a.check.split(","):
            run["layouts"] = {}
            for n in map(int, a.shards.split(",")):
                parts = [sweep(one_loss, a.optimizer, grid, seeds, a.steps, batch_size=bs, shard=(i, n), **kw)
                         for i in range(n)]
                run["layouts"][f"{n} shards"] = _differences(whole, parts, models)
        out["runs"].append(run)
        one_call = run["run_s"] if size == "all" else one_call
        lay = "; ".join(f"{k}: " + ("bit for bit" if v["records_identical"] and not any(
            x for kk, x in v.items() if kk not in ("records_identical", "solver_steps_differ")) else
            "max diff " + f"{max(x for kk, x in v.items() if kk not in ('records_identical', 'solver_steps_differ')):.1e}"
            + f", solver steps differ {v['solver_steps_differ']}") for k, v in run.get("layouts", {}).items())
        print(f"{size:>10s} {calls[0]:13.1f} {calls[1]:8.1f}  {lay}", flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(a.out), out)
    if one_call:
        for r in out["runs"]:
            r["run_over_one_call"] = r["run_s"] / one_call
        print("run / one call: " + ", ".join(f"{r['batch_size']}: {r['run_over_one_call']:.2f}" for r in out["runs"]))
    write_json(Path(a.out), out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
