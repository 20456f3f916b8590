"""Sweep throughput: B configurations vmapped in one compiled call vs a Python loop of jitted calls.

GD on the digits MLP (2,410 parameters, float32; ``--problem`` picks another), learning rates
spread geometrically over 0.25x .. 2x the problem's default, for the discrete optimizer (with its sharpness probes) and the rod flow. The loop
calls the *same* code with a batch of one configuration, compiled once (compile time is
reported separately and excluded from the throughput). The loop over B > ``--loop-max``
configurations is timed on the first ``--loop-max`` and extrapolated linearly (it is a loop of
identical calls); the JSON says so. Peak memory is the process's ``ru_maxrss`` after each
stage (monotone: a stage's own peak is at most that value).

    python benchmarks/sweep.py --out benchmarks/results/sweep.json
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from pathlib import Path

import jax
import numpy as np

import rodflow_jax as rf
from rodflow_jax.experiments import rollout_batch, solve_batch, stack_trees, write_json


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _block(x):
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def _index(tree, i):
    return jax.tree.map(lambda x: x[i : i + 1], tree)


def _timed(f):
    t = time.perf_counter()
    out = _block(f())
    return out, time.perf_counter() - t


def bench(problem: str, B: int, steps: int, probe_every: int, probe_iter: int, loop_max: int, models) -> dict:
    """The engine's own kernels (rollout, solve), batched over B configurations and at batch 1."""
    prob = rf.get_problem(problem)
    lr0 = prob.learning_rates["gd"]
    lrs = list(np.geomspace(0.25 * lr0, 2.0 * lr0, B))
    loss_fn, p0 = prob.make(0)
    opt = stack_trees([rf.make_optimizer("gd", learning_rate=lr) for lr in lrs])
    params = stack_trees([p0] * B)
    res = {"num_configurations": B, "steps": steps, "learning_rates": [min(lrs), max(lrs)]}
    save = [0, 1]

    def disc(o, p):
        return rollout_batch(o, p, loss_fn, steps, save)

    d, first = _timed(lambda: disc(opt, params))
    d, run = _timed(lambda: disc(opt, params))
    res["discrete"] = {"vmap_first_call_s": first, "vmap_run_s": run, "vmap_compile_s": max(first - run, 0.0)}
    n_loop = min(B, loop_max)
    _, first1 = _timed(lambda: disc(_index(opt, 0), _index(params, 0)))
    t = time.perf_counter()
    singles = [disc(_index(opt, i), _index(params, i)) for i in range(n_loop)]
    loop = (time.perf_counter() - t) * B / n_loop
    res["discrete"].update(loop_run_s=loop, loop_compile_s=max(first1 - loop / B, 0.0), loop_timed_configs=n_loop,
                           speedup=loop / run, maxrss_mb=_maxrss_mb())
    np.testing.assert_allclose(singles[-1].loss[0], d.loss[n_loop - 1], rtol=2e-4)
    if "rod" in models:
        def states(r, sl=slice(None)):
            phase, slow = jax.tree.map(lambda x: x[sl], r.saved)
            at = lambda j: jax.tree.map(lambda x: x[:, j], (phase, slow))  # noqa: E731
            return (*at(0), *at(1))

        def rod(o, st, b):
            return solve_batch("rod", o, loss_fn, st, np.arange(0, steps), np.asarray([steps - 1]), np.full(b, np.inf))

        r, first = _timed(lambda: rod(opt, states(d), B))
        r, run = _timed(lambda: rod(opt, states(d), B))
        nsteps = np.asarray(r.num_steps)
        res["rod"] = {"vmap_first_call_s": first, "vmap_run_s": run, "vmap_compile_s": max(first - run, 0.0),
                      "solver_steps_max": int(nsteps.max()), "solver_steps_mean": float(nsteps.mean()),
                      "failed": int((np.asarray(r.result) != 0).sum())}
        _, first1 = _timed(lambda: rod(_index(opt, 0), states(singles[0]), 1))
        t = time.perf_counter()
        for i in range(n_loop):
            _block(rod(_index(opt, i), states(singles[i]), 1))
        loop = (time.perf_counter() - t) * B / n_loop
        # the vmapped while loop runs until its slowest member finishes: the bound on the speed-up
        res["rod"].update(loop_run_s=loop, loop_compile_s=max(first1 - loop / B, 0.0), loop_timed_configs=n_loop,
                          speedup=loop / run, lockstep_efficiency=float(nsteps.mean() / nsteps.max()),
                          maxrss_mb=_maxrss_mb())
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="mlp-digits")
    ap.add_argument("--sizes", default="64,256")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--probe-every", type=int, default=20)
    ap.add_argument("--probe-iter", type=int, default=8)
    ap.add_argument("--loop-max", type=int, default=64)
    ap.add_argument("--models", default="discrete,rod")
    ap.add_argument("--out", default="benchmarks/results/sweep.json")
    a = ap.parse_args()
    out = {"device": str(jax.devices()[0]), "num_devices": len(jax.devices()), "machine": platform.platform(),
           "dtype": "float32", "problem": a.problem, "probe_every": a.probe_every, "probe_iter": a.probe_iter, "optimizer": "gd", "runs": []}
    print(f"devices: {jax.devices()}")
    print(f"{'B':>5s} {'model':9s} {'vmap s':>8s} {'loop s':>8s} {'speedup':>8s} {'compile vmap/loop s':>20s} {'maxrss MB':>10s}")
    for B in map(int, a.sizes.split(",")):
        res = bench(a.problem, B, a.steps, a.probe_every, a.probe_iter, a.loop_max, a.models.split(","))
        out["runs"].append(res)
        for m in ("discrete", "rod"):
            if m in res:
                e = res[m]
                extra = f"  (loop extrapolated from {e['loop_timed_configs']})" if e["loop_timed_configs"] < B else ""
                print(f"{B:5d} {m:9s} {e['vmap_run_s']:8.2f} {e['loop_run_s']:8.2f} {e['speedup']:8.1f}x "
                      f"{e['vmap_compile_s']:9.1f}/{e['loop_compile_s']:<9.1f} {e['maxrss_mb']:10.0f}{extra}")
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(a.out), out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
