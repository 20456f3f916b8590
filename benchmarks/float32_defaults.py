"""Which built-in default rates stay stable in float32? (the `*` marks in `rodflow list`)

For every problem and optimizer, the discrete run at the problem's default hyperparameters in
float32 for seeds 0-2 (one vmapped sweep per cell). Prints a table and writes
``benchmarks/results/float32_defaults.json``.

    python benchmarks/float32_defaults.py [--problems toy,deep-linear]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import rodflow_jax as rf
from rodflow_jax.experiments import write_json

OUT = Path(__file__).parent / "results" / "float32_defaults.json"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--problems", default=",".join(rf.PROBLEMS))
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    rows = []
    print(f"{'problem':18s} {'optimizer':15s} diverged (seeds 0-2)   wall")
    for prob in args.problems.split(","):
        for name in rf.OPTIMIZERS:
            t = time.perf_counter()
            res = rf.sweep(prob, name, {}, seeds=[0, 1, 2], models=("discrete",), probe_every=10**9)
            div = [r["discrete"]["diverged_at"] for r in res.records]
            rows.append({"problem": prob, "optimizer": name, "diverged_at": div})
            print(f"{prob:18s} {name:15s} {json.dumps(div):22s} {time.perf_counter() - t:5.1f} s", flush=True)
    write_json(Path(args.out), rows)


if __name__ == "__main__":
    main()
