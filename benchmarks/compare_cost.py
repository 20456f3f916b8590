"""Wall time of a default ``compare`` per built-in problem, split into discrete / flows / probes.

Also 1,500 GD steps on a ~900-parameter tanh network on a synthetic regression task (a user
problem the built-ins do not include; the issue's 198 s case). Each compare runs twice in one
process; the second (compiled) run is reported beside the first (compile included). Writes
``benchmarks/results/compare_cost.json``.

    python benchmarks/compare_cost.py [--problems mlp-digits,toy] [--float64]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

OUT = Path(__file__).parent / "results" / "compare_cost.json"


def regression_900(seed: int = 0):
    """A 6-24-24-6 tanh network (918 parameters) fitting a fixed random teacher on 256 points."""
    k = jax.random.split(jax.random.PRNGKey(seed), 6)
    dims = [6, 24, 24, 6]
    x = jax.random.normal(jax.random.PRNGKey(100), (256, 6))
    teacher = jnp.sin(2 * x @ jax.random.normal(jax.random.PRNGKey(101), (6, 6)))
    params = [(jax.random.normal(k[i], (a, b)) / a**0.5, jnp.zeros(b)) for i, (a, b) in enumerate(zip(dims, dims[1:]))]

    def loss(ps):
        h = x
        for i, (w, b) in enumerate(ps):
            h = h @ w + b
            if i < len(ps) - 1:
                h = jnp.tanh(h)
        return 0.5 * jnp.mean(jnp.sum((h - teacher) ** 2, axis=-1))

    return loss, params


def split(timings: dict) -> dict:
    probes = sum(v for k, v in timings.items() if k.endswith("probes"))
    flows = sum(v for k, v in timings.items() if not k.endswith("probes") and k != "discrete")
    total = timings.get("discrete", 0) + flows + probes
    return {"discrete_s": timings.get("discrete"), "flows_s": flows, "probes_s": probes, "total_s": total,
            "probe_share": probes / total if total else None}


def main(argv=None):
    import rodflow_jax as rf

    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="toy,quadratic,deep-linear,mlp-digits,mlp-digits-ce,transformer-sort,"
                    "cnn-digits,regression-900")
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    if args.float64:
        jax.config.update("jax_enable_x64", True)
    rows = []
    print(f"{'problem':18s} {'params':>7s} {'steps':>6s} {'first s':>8s} {'run s':>7s} {'discrete':>9s} {'flows':>7s} "
          f"{'probes':>7s} {'probe %':>8s}")
    for name in args.problems.split(","):
        if name == "regression-900":
            (loss_fn, params0), steps, lr = regression_900(), 1500, 0.5
        else:
            prob = rf.get_problem(name)
            (loss_fn, params0), steps, lr = prob.make(0), prob.default_steps, prob.learning_rates["gd"]
        opt = rf.make_optimizer("gd", learning_rate=lr)
        t = time.perf_counter()
        rf.compare(loss_fn, params0, opt, steps)
        first = time.perf_counter() - t
        t = time.perf_counter()
        c = rf.compare(loss_fn, params0, opt, steps)
        run = time.perf_counter() - t
        row = {"problem": name, "num_params": c.metrics["num_params"], "steps": steps, "learning_rate": lr,
               "first_call_s": first, "run_s": run, **split(c.timings), "timings": c.timings,
               "probe_hvps": {m: c.metrics[m]["probe_cost"] for m in ("discrete", "stable", "rod")},
               "eos_onset_step": c.metrics["eos_onset_step"]}
        rows.append(row)
        print(f"{name:18s} {row['num_params']:7d} {steps:6d} {first:8.1f} {run:7.1f} {row['discrete_s']:9.1f} "
              f"{row['flows_s']:7.1f} {row['probes_s']:7.1f} {100 * row['probe_share']:7.0f}%", flush=True)
    out = {"machine": platform.platform(), "cpus": jax.local_device_count(), "device": str(jax.devices()[0]),
           "float64": args.float64, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
