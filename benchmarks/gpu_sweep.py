"""The sweep at accelerator size: ``--lrs x --seeds`` configurations (default 256 x 4 = 1024) of GD on
the digits MLP, discrete and rod flow, each model vmapped in calls of ``--batch-size`` configurations a
device (the sweep's default: 128 on an accelerator; ``all``: one call) sharded over all local
devices (``devices="all"``). Prints the devices, the wall time (compile included and excluded)
and writes JSON. Meant to finish in under 5 minutes on one GPU; on CPU use small sizes.

    python benchmarks/gpu_sweep.py --out benchmarks/results/gpu_sweep.json
    python benchmarks/gpu_sweep.py --lrs 8 --seeds 2 --steps 50 --out /tmp/gpu_sweep_cpu.json   # CPU check
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from pathlib import Path

import jax
import numpy as np

from rodflow_jax import sweep
from rodflow_jax.experiments import write_json
from rodflow_jax.problems import get_problem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lrs", type=int, default=256)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--models", default="discrete,rod")
    ap.add_argument("--out", default="benchmarks/results/gpu_sweep.json")
    ap.add_argument("--batch-size", default="auto", help="configurations per call a device: auto, N or all")
    a = ap.parse_args()
    print(f"devices: {jax.devices()}")
    prob = get_problem("mlp-digits")
    lr0 = prob.learning_rates["gd"]
    make = functools.lru_cache(prob.make)  # the same loss_fn object each call: the second call reuses the compilation
    grid = {"learning_rate": list(np.geomspace(0.25 * lr0, 2.0 * lr0, a.lrs))}
    B = a.lrs * a.seeds
    batch = -(-B // jax.device_count()) if a.batch_size == "all" else a.batch_size
    kw = dict(models=a.models.split(","), devices="all", progress=True, batch_size=batch)
    timings = []
    for label in ("first call (compile + run)", "second call (run)"):
        t = time.perf_counter()
        res = sweep(make, "gd", grid, list(range(a.seeds)), a.steps, **kw)
        timings.append(time.perf_counter() - t)
        print(f"{label}: {timings[-1]:.1f} s for {len(res.records)} configurations x {a.steps} steps")
    n_div = sum(r["discrete"]["diverged"] for r in res.records)
    n_fail = sum(r.get("rod", {}).get("failed", False) for r in res.records)
    out = {"devices": [str(d) for d in jax.devices()], "machine": platform.platform(),
           "num_configurations": len(res.records), "steps": a.steps, "models": kw["models"], "batch_size": batch,
           "first_call_s": timings[0], "second_call_s": timings[1], "diverged": n_div, "rod_failed": n_fail,
           "sweep_info": res.info}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(a.out), out)
    print(f"{n_div} diverged (discrete), {n_fail} rod flows failed; wrote {a.out}")


if __name__ == "__main__":
    main()
