"""Catapult counts of the rod against the discrete run, under the catapult rule and the one before it.

Reruns the fidelity grid's cells of the cheap problems (toy, deep-linear, mlp-digits; each
optimizer at its own momentum and at 0.9), keeps each cell's trajectories, and for the at-edge
cells whose discrete run catapults after the flows' start (the pre-edge start where a cell has
one, as in ``fidelity.targets``) counts the catapults of the discrete run and of the default
rod with ``rodflow_jax._catapults.detect_catapults``, twice: spikes merged within 25 steps of
the previous spike's *start* (the rule since stop 41) and of its *end* (before). Prints one line
a cell and the totals (same count, first catapult on time), and writes JSON.

    python benchmarks/catapult_counts.py --out benchmarks/results/catapult_counts_stop41.json
    python benchmarks/catapult_counts.py --problems toy --cache /tmp/cells      # reuse saved cells
    python benchmarks/catapult_counts.py --cache /tmp/cells --cached-only       # only the saved cells
    python benchmarks/catapult_counts.py --problems cnn-digits --optimizers adam --models discrete,rod \
        --counted-start-only --cache /tmp/cells                                # a costly cell, cheaply
    python benchmarks/catapult_counts.py --problems toy,deep-linear,mlp-digits,transformer-sort,cnn-digits \
        --cache /tmp/cells --cached-only --out benchmarks/results/catapult_counts_stop42.json
    python benchmarks/catapult_counts.py --problems toy,deep-linear --models discrete,rod1,rod2,inertial \
        --cache /tmp/constructions      # every construction (a cache of its own: cells hold the models they ran)

``--cache DIR`` keeps each cell's trajectories and metrics (``CELL.npz``, ``CELL.json``) and
reads them back instead of rerunning the cell (about 25 minutes for all three problems on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity as F  # noqa: E402  (sets float64)

import rodflow_jax as rf  # noqa: E402
from rodflow_jax._catapults import detect_catapults, first_on_time, reference_floor  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402

PROBLEMS = ["toy", "deep-linear", "mlp-digits"]


def _tag(pname, name, momentum) -> str:
    return f"{pname}_{name}_{momentum if momentum is not None else 'own'}"


def cell_runs(pname, name, momentum, cache: Path | None, models=("discrete", "stable", "rod"), starts=None):
    """``{start: (trajectories, metrics)}`` of one cell, from ``cache`` where it holds them."""
    tag = _tag(pname, name, momentum)
    if cache is not None and (cache / f"{tag}.json").exists():
        metrics = json.loads((cache / f"{tag}.json").read_text())
        with np.load(cache / f"{tag}.npz") as z:
            traj = {k: dict() for k in metrics}
            for key in z.files:
                start, _, field = key.partition("/")
                traj[start][field] = z[key]
        return {k: (traj[k], metrics[k]) for k in metrics}
    problem = rf.get_problem(pname)
    _, cmps = F.run_cell(problem, name, overrides=F.momentum_overrides(problem, name, momentum), models=models,
                         **({"starts": starts} if starts else {}))
    runs = {k: ({f: np.asarray(v) for f, v in c.trajectories.items()}, c.metrics) for k, c in cmps.items()}
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache / f"{tag}.npz", **{f"{k}/{f}": v for k, (t, _) in runs.items() for f, v in t.items()})
        (cache / f"{tag}.json").write_text(json.dumps({k: m for k, (_, m) in runs.items()}, default=str))
    return runs


def counts(t, m, merge_from: str, model: str = "rod") -> tuple[list[int], list[int]]:
    """The discrete run's and the rod's (``model``'s) catapults after the start, as ``metrics.json``
    counts them."""
    K, steps = m["start_step"], t["step"]
    disc = detect_catapults(t["discrete_avg_loss"], steps, sharpness=t["discrete_sharpness"][:, 0],
                            sharpness_steps=t["discrete_sharpness_step"], merge_from=merge_from)
    rod_loss = t[f"{model}_loss"][K:]
    rod = detect_catapults(rod_loss, steps[K:], sharpness=t[f"{model}_sharpness"][:, 0],
                           sharpness_steps=t[f"{model}_sharpness_step"],
                           floor=reference_floor(t["discrete_avg_loss"], rod_loss), merge_from=merge_from)
    return [int(k) for k in disc if k >= K], [int(k) for k in rod if k >= K]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--optimizers", default=None, help="comma list (default: all nine)")
    ap.add_argument("--momentum", default="own,0.9", help="as fidelity.py's (default: own,0.9)")
    ap.add_argument("--models", default="discrete,stable,rod",
                    help="models a rerun cell runs (the counts need discrete,rod; the stable flow is kept for "
                         "other uses of the cache)")
    ap.add_argument("--cache", default=None, help="folder of saved cells (read where present, written otherwise)")
    ap.add_argument("--counted-start-only", action="store_true",
                    help="run the flows from the counted start alone (half the flows' cost)")
    ap.add_argument("--cached-only", action="store_true", help="skip the cells that --cache does not hold")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    cache = Path(args.cache) if args.cache else None
    optimizers = args.optimizers.split(",") if args.optimizers else F.OPTIMIZERS
    tasks = F.grid_tasks(args.problems.split(","), optimizers, F.parse_momenta(args.momentum))
    rows, t0 = [], time.perf_counter()
    rods = [x for x in args.models.split(",") if x not in ("discrete", "stable")]  # the rods counted
    skipped = []
    for pname, name, momentum in tasks:
        if args.cached_only and not (cache / f"{_tag(pname, name, momentum)}.json").exists():
            skipped.append(_tag(pname, name, momentum))
            continue
        runs = cell_runs(pname, name, momentum, cache, tuple(args.models.split(",")),
                         ("counted",) if args.counted_start_only else None)
        start = "pre_edge" if "pre_edge" in runs else "default"
        t, m = runs[start]
        if m["discrete"].get("diverged_at") is not None or (m.get("eos_fraction") or 0) < 0.5:
            continue  # the at-edge cells only
        row = {"problem": pname, "optimizer": name, "momentum": momentum, "start": start,
               "start_step": m["start_step"], "models": {}}
        for model in [x for x in rods if f"{x}_loss" in t]:
            row["models"][model] = {"construction": m[model].get("construction")}
            for rule in ("start", "end"):
                disc, rod = counts(t, m, rule, model)
                row["models"][model][rule] = {"discrete": disc, "rod": rod, "same_count": len(disc) == len(rod),
                                              "first_on_time": bool(disc and rod and first_on_time(disc[0], rod[0]))}
        if not row["models"]:
            skipped.append(f"{_tag(pname, name, momentum)} (the cache holds none of {', '.join(rods)})")
            continue
        first = next(iter(row["models"].values()))
        if not first["start"]["discrete"] and not first["end"]["discrete"]:
            continue  # no catapult after the start
        row.update(construction=first["construction"], start=first["start"], end=first["end"])  # the first model's
        row["start_name"] = start
        rows.append(row)
        cells = f"{pname} {name}" + (f" (b={momentum})" if momentum is not None else "")
        for model, c in row["models"].items():
            print(f"{cells:30s} {model:9s} K={row['start_step']:4d} " + " | ".join(
                f"from {r}: {len(c[r]['discrete'])} vs {len(c[r]['rod'])}"
                f"{' same' if c[r]['same_count'] else ' DIFF'}{' on time' if c[r]['first_on_time'] else ' LATE'}"
                for r in ("start", "end")), flush=True)
    total = {}
    for model in rods:
        for r in ("start", "end"):  # each rule over the cells where it finds a discrete catapult
            own = [x["models"][model][r] for x in rows if model in x["models"] and x["models"][model][r]["discrete"]]
            if not own:
                continue
            key = r if model == rods[0] else f"{model}/{r}"
            total[key] = {"cells": len(own), "same_count": sum(x["same_count"] for x in own),
                          "first_on_time": sum(x["first_on_time"] for x in own)}
            print(f"{model}: merge counted from the {r}: same count {total[key]['same_count']}/{len(own)}, "
                  f"first catapult on time {total[key]['first_on_time']}/{len(own)}")
    print(f"({time.perf_counter() - t0:.0f} s)" + (f"; not in the cache, skipped: {', '.join(skipped)}" if skipped else ""))
    if args.out:
        write_json(Path(args.out), {"rows": rows, "totals": total, "skipped": skipped})
    return rows, total


if __name__ == "__main__":
    main()
