"""How predictable are the discrete run's own catapults? The ceiling for any flow.

A flow starts from the iterates with an error of at least rounding and its solver's tolerance;
after the first catapult it and the discrete run can land on different points of the valley. To
tell a model's error from the run's own sensitivity, each cell's discrete run is repeated from
``params0 (1 + delta xi)`` (``xi`` standard normal per entry, ``delta`` relative, a few seeds) and its
catapults (``metrics.json``'s rule, ``rodflow_jax/_catapults.py``) after the cell's start are
scored against the unperturbed run's exactly as a flow's are: the first catapult on time (within
max(3 %, 15 steps)) and the same count. A cell where the perturbed runs themselves miss cannot be
matched by any model started within ``delta`` of the iterates.

    python benchmarks/catapult_predictability.py --out benchmarks/results/catapult_predictability.json
    python benchmarks/catapult_predictability.py --cells toy:gd,mlp-digits:heavy_ball:0.9 --deltas 1e-12,1e-9
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # noqa: E402  (sets float64)

import rodflow_jax as rf  # noqa: E402
from rodflow_jax._catapults import first_on_time  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402

# the at-edge cells of the grid whose discrete run catapults after its start (600 steps)
CELLS = ["toy:gd", "toy:heavy_ball", "toy:nesterov", "toy:rmsprop", "toy:scalar_rmsprop", "toy:nadam",
         "toy:scalar_nadam", "deep-linear:rmsprop", "deep-linear:scalar_rmsprop", "deep-linear:adam",
         "deep-linear:scalar_nadam", "mlp-digits:gd", "mlp-digits:heavy_ball", "mlp-digits:nesterov",
         "mlp-digits:heavy_ball:0.9", "mlp-digits:nesterov:0.9", "transformer-sort:gd",
         "transformer-sort:heavy_ball", "transformer-sort:nesterov", "transformer-sort:nesterov:0.9"]


def _perturbed(params0, delta: float, seed: int):
    leaves, tree = jax.tree.flatten(params0)
    rng = np.random.default_rng(seed)
    out = [np.asarray(x) * (1.0 + delta * rng.standard_normal(np.shape(x))) for x in leaves]
    return jax.tree.unflatten(tree, [jax.numpy.asarray(x, dtype=np.asarray(l).dtype) for x, l in zip(out, leaves)])


def run(cell: str, deltas, seeds: int, steps: int):
    pname, name, *momentum = cell.split(":")
    problem = rf.get_problem(pname)
    loss_fn, params0 = problem.make(0)
    overrides = fidelity.momentum_overrides(problem, name, float(momentum[0])) if momentum else None
    opt, hp = fidelity.make_cell_optimizer(problem, name, overrides)
    kw = dict(probe_every=max(1, steps // 50), models=["discrete"])
    K0 = rf.default_start_step(opt)
    t = time.perf_counter()
    base = rf.compare(loss_fn, params0, opt, steps, start_step=K0, **kw).metrics
    onset = base["eos_onset_step"]
    K = K0  # the grid's targets use each cell's pre-edge start where it has one
    if onset is not None and not momentum:
        K = fidelity.pre_edge_start(K0, onset, steps)
        K = K if K0 < K <= steps - 2 else K0
    ref = [k for k in base["discrete"]["catapult_steps"] if k >= K]
    rows = []
    for delta in deltas:
        for seed in range(seeds):
            m = rf.compare(loss_fn, _perturbed(params0, delta, seed), opt, steps, start_step=K0, **kw).metrics
            got = [k for k in m["discrete"]["catapult_steps"] if k >= K]
            rows.append(dict(problem=pname, optimizer=name, hyperparameters=hp, start_step=K, delta=delta, seed=seed,
                             reference=ref, perturbed=got,
                             first_on_time=None if not ref else bool(got) and first_on_time(ref[0], got[0]),
                             first_shift=(got[0] - ref[0]) if ref and got else None,
                             same_count=len(got) == len(ref)))
    wall = time.perf_counter() - t
    for r in rows:
        r["wall_s"] = wall
    shifts = [r["first_shift"] for r in rows]
    print(f"{pname:16s} {fidelity._label(name, hp):22s} K={K:4d} reference {ref}: same count "
          f"{sum(r['same_count'] for r in rows)}/{len(rows)}, first on time {sum(bool(r['first_on_time']) for r in rows)}"
          f"/{len(rows)}, first shifts {shifts} ({wall:.0f} s)", flush=True)
    return rows


def summary(rows) -> str:
    lines = []
    for delta in sorted({r["delta"] for r in rows}):
        cells: dict = {}
        for r in rows:
            if r["delta"] == delta and r["reference"]:
                cells.setdefault((r["problem"], r["optimizer"], json.dumps(r["hyperparameters"], sort_keys=True)), []).append(r)
        n = len(cells)
        on = sum(all(r["first_on_time"] for r in rs) for rs in cells.values())
        same = sum(all(r["same_count"] for r in rs) for rs in cells.values())
        lines.append(f"delta {delta:g}: of {n} catapulting cells, every perturbed run has the first catapult on "
                     f"time in {on} and the same count in {same}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS), help="comma list of problem:optimizer[:momentum]")
    ap.add_argument("--deltas", default="1e-9", help="comma list of relative perturbations of params0")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, {platform.machine()}", flush=True)
    rows, t = [], time.perf_counter()
    for cell in args.cells.split(","):
        rows += run(cell, [float(d) for d in args.deltas.split(",")], args.seeds, args.steps)
        if args.out:
            write_json(Path(args.out), {"description": __doc__.splitlines()[0], "platform": platform.machine(),
                                        "jax": jax.__version__, "rows": rows, "total_wall_s": time.perf_counter() - t})
    print()
    print(summary(rows))
    return rows


if __name__ == "__main__":
    main()
