"""A rod's initial half-vector: ``(z_{K+1} - z_K)/2`` against the iterates' period-2 part.

For each cell (problem x optimizer at the fidelity grid's settings) and both of the grid's
starts (the default start and the pre-edge one, ``fidelity.PRE_EDGE`` of the run before the
discrete onset), the default rod (``rod``: the optimizer's construction) and the first-order
rod (``rod1``) are run twice: with the half-vector of order 1 (the two iterates' half
difference) and of order ``PERIOD_TWO_ORDER`` (the binomial alternating difference of
``z_K .. z_{K+n}``; ``rodflow_jax/flows/_rod.py``). Reported per run: the catapults of the
predicted loss against the discrete run's (``metrics.json``'s rule), the first one's timing
error (negative: early), the count difference, the final and the largest parameter error, and
the rod's ``|r|`` at the start.

    python benchmarks/period_two_start.py --out benchmarks/results/period_two_start.json
    python benchmarks/period_two_start.py --cells toy:gd,mlp-digits:gd --orders 1,8
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
from rodflow_jax.experiments import write_json  # noqa: E402
from rodflow_jax.flows import _rod  # noqa: E402
from rodflow_jax.flows._rod import PERIOD_TWO_ORDER  # noqa: E402

CELLS = ["toy:gd", "toy:rmsprop", "toy:scalar_rmsprop", "toy:nesterov", "deep-linear:scalar_rmsprop",
         "mlp-digits:gd", "mlp-digits:nesterov", "transformer-sort:nesterov"]


def run(cell: str, orders, models, steps=None):
    pname, name, *momentum = cell.split(":")  # problem:optimizer[:momentum], as the grid's rows
    problem = rf.get_problem(pname)
    loss_fn, params0 = problem.make(0)
    overrides = fidelity.momentum_overrides(problem, name, float(momentum[0])) if momentum else None
    opt, hp = fidelity.make_cell_optimizer(problem, name, overrides)
    steps = steps or problem.default_steps
    kw = dict(probe_every=max(1, steps // 50))
    K0 = rf.default_start_step(opt)
    base = rf.compare(loss_fn, params0, opt, steps, start_step=K0, models=["discrete"], **kw).metrics
    onset, disc = base["eos_onset_step"], base["discrete"]["catapult_steps"]
    starts = {"default": K0}
    if onset is not None:
        K = fidelity.pre_edge_start(K0, onset, steps)
        if K > K0 and K <= steps - 2:
            starts["pre_edge"] = K
    rows = []
    for start, K in starts.items():
        for order in orders:
            _rod.PERIOD_TWO_ORDER = order  # the drivers read it through period_two_order
            t = time.perf_counter()
            m = rf.compare(loss_fn, params0, opt, steps, start_step=K, models=["discrete", *models], **kw).metrics
            wall = time.perf_counter() - t
            for f in models:
                x = m[f]
                rows.append(dict(problem=pname, optimizer=name, hyperparameters=hp, start=start, start_step=K,
                                 eos_onset_step=onset, order=order, model=f, construction=x.get("construction"),
                                 discrete_catapults=disc, catapults=x["catapult_steps"],
                                 first_timing_error=x["first_catapult_timing_error"],
                                 count_difference=x["catapult_count_difference"],
                                 first_on_time=_on_time(disc, x["catapult_steps"]),
                                 error_final=x["param_rel_error_final"], error_max=x["param_rel_error_max"],
                                 failed=x["failed"], solver_steps=x["solver_steps"], wall_s=wall))
                r = rows[-1]
                print(f"{pname:16s} {name:14s} {start:8s} K={K:4d} order {order} {f:5s} ({r['construction']}): "
                      f"first {r['first_timing_error']} count {r['count_difference']} "
                      f"err {r['error_final']:.3g} max {r['error_max']:.3g} ({wall:.0f} s)", flush=True)
    _rod.PERIOD_TWO_ORDER = PERIOD_TWO_ORDER
    return rows


def _on_time(disc, model):
    from rodflow_jax._catapults import first_on_time

    return None if not disc else bool(model) and first_on_time(disc[0], model[0])


def table(rows) -> str:
    orders = sorted({r["order"] for r in rows})
    head = "| problem | optimizer | K | model | discrete catapults | " + " | ".join(
        f"order {o}: first dt, count diff, final / max err" for o in orders) + " |"
    out = [head, "|" + "---|" * (5 + len(orders))]
    keys = list(dict.fromkeys((r["problem"], r["optimizer"], r["start_step"], r["model"]) for r in rows))
    for k in keys:
        by = {r["order"]: r for r in rows if (r["problem"], r["optimizer"], r["start_step"], r["model"]) == k}
        any_r = next(iter(by.values()))
        cells = []
        for o in orders:
            r = by.get(o)
            cells.append("-" if r is None else
                         f"{_signed(r['first_timing_error'])}, {_signed(r['count_difference'])}, "
                         f"{r['error_final']:.3g} / {r['error_max']:.3g}")
        out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} ({any_r['construction']}) | "
                   f"{len(any_r['discrete_catapults'])} (first {any_r['discrete_catapults'][0] if any_r['discrete_catapults'] else '-'}) | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def summary(rows) -> str:
    lines = []
    for o in sorted({r["order"] for r in rows}):
        for f in sorted({r["model"] for r in rows}):
            rs = [r for r in rows if r["order"] == o and r["model"] == f and r["discrete_catapults"]]
            on = sum(bool(r["first_on_time"]) for r in rs)
            same = sum(r["count_difference"] == 0 for r in rs)
            every = [r for r in rows if r["order"] == o and r["model"] == f and r["error_final"] is not None]
            gm = lambda k: float(np.exp(np.mean([np.log(max(r[k], 1e-300)) for r in every])))  # noqa: E731
            lines.append(f"order {o}, {f}: first catapult on time in {on}/{len(rs)} runs that catapult, "
                         f"same count in {same}/{len(rs)}; final / max error (geometric mean over {len(every)} "
                         f"runs) {gm('error_final'):.3g} / {gm('error_max'):.3g}")
    return "\n".join(lines)


def _signed(x):
    return "-" if x is None else f"{x:+d}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS),
                    help="comma list of problem:optimizer or problem:optimizer:momentum (the grid's momentum rows)")
    ap.add_argument("--orders", default=f"1,{PERIOD_TWO_ORDER}")
    ap.add_argument("--models", default="rod,rod1")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--table-from", default=None, help="print the table of a saved JSON, run nothing")
    args = ap.parse_args(argv)
    if args.table_from:
        rows = json.loads(Path(args.table_from).read_text())["rows"]
    else:
        print(f"device: {jax.devices()[0].device_kind}, {platform.machine()}", flush=True)
        rows, t = [], time.perf_counter()
        for cell in args.cells.split(","):
            rows += run(cell, [int(o) for o in args.orders.split(",")], args.models.split(","), args.steps)
            if args.out:
                write_json(Path(args.out), {"description": __doc__.splitlines()[0], "platform": platform.machine(),
                                            "jax": jax.__version__, "rows": rows,
                                            "total_wall_s": time.perf_counter() - t})
    print()
    print(table(rows))
    print()
    print(summary(rows))
    return rows


if __name__ == "__main__":
    main()
