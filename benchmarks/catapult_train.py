"""Why a rod fires a different number of catapults: the train, catapult by catapult.

For each cell (``problem:optimizer``, at the fidelity grid's settings, or with ``:lr=...`` and
other hyperparameters appended) and a start step, the discrete run and the default rod are run
(float64, every step saved) and their catapults detected by ``metrics.json``'s rule on the loss
alone (``rodflow_jax._catapults.detect_catapults``; the grid's rule also asks for a sharpness drop,
which is probed at the iterates for the discrete run and at the centre for a flow). Per catapult it
reports the step and the loss peak of each; per interval between catapults the *trough*: the least
oscillation amplitude (the discrete run's drift-free ``|z_{k+1} - 2 z_k + z_{k-1}|/4``, the rod's
``|r|``), and, for an adaptive optimizer, the rod's slow state over the discrete midpoint's
``(s_k + s_{k+1})/2`` at the trough (the norm of the second-moment leaves). An oscillation that
grows at ``x`` per step from a trough ``a`` reaches a catapult after ``log(A/a)/x`` steps, so a
shallower trough, or a preconditioner that lets the sharpness sit closer to the threshold, shortens
the next interval.

    python benchmarks/catapult_train.py --out benchmarks/results/catapult_train.json
    python benchmarks/catapult_train.py --cells toy:scalar_rmsprop@126,mlp-digits:gd
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
from rodflow_jax._catapults import detect_catapults, loss_floor, reference_floor  # noqa: E402
from rodflow_jax._tree import tree_norm  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402
from rodflow_jax.experiments._evaluate import evaluate  # noqa: E402
from rodflow_jax.flows._registry import resolve  # noqa: E402

CELLS = ["toy:gd", "toy:gd@30", "toy:scalar_rmsprop", "toy:scalar_rmsprop@126", "toy:rmsprop",
         "deep-linear:scalar_rmsprop", "deep-linear:scalar_rmsprop@66"]


def parse_cell(cell: str):
    """``problem:optimizer[:key=value...][@K]``."""
    cell, _, start = cell.partition("@")
    pname, name, *kv = cell.split(":")
    overrides = {k: float(v) for k, v in (item.split("=") for item in kv)}
    return pname, name, overrides, (int(start) if start else None)


def _nu_norm(slow):
    """The norm of the second-moment leaves at each saved step (``None`` without any)."""
    nu = getattr(slow, "nu", None)
    return None if nu is None or not jax.tree.leaves(nu) else np.asarray(jax.vmap(tree_norm)(nu))


def intervals(catapults, steps: int):
    edges = list(catapults) + [steps]
    return list(zip(edges[:-1], edges[1:]))


def run(cell: str, steps: int):
    pname, name, overrides, K = parse_cell(cell)
    problem = rf.get_problem(pname)
    loss_fn, params0 = problem.make(0)
    opt, hp = fidelity.make_cell_optimizer(problem, name, overrides)
    K = rf.default_start_step(opt) if K is None else K
    rod = resolve("rod", opt)
    batch = jax.tree.map(lambda x: x[None], (opt, params0))
    t0 = time.perf_counter()
    ev = evaluate(loss_fn, *batch, steps, K, ["discrete", rod], threshold_quantity="", probe_every=steps)
    wall = time.perf_counter() - t0
    r = ev.discrete.rollout
    D = np.asarray(ev.avg_loss[0])
    L = np.full(steps, np.nan)
    f = ev.flows[rod].arrays
    L[K:] = np.asarray(f.loss[0])
    d_cat = [int(c) for c in detect_catapults(D, np.arange(steps), floor=loss_floor(D)) if c >= K]
    ok = np.isfinite(L)
    r_cat = [int(c) for c in detect_catapults(L[ok], np.nonzero(ok)[0], floor=reference_floor(D, L[ok]))]
    amp = np.asarray(r.amplitude[0])[:steps]
    half = np.full(steps, np.nan)
    half[K:] = np.asarray(f.half_norm[0])
    nu_d = _nu_norm(jax.tree.map(lambda x: x[0], r.saved[1]))
    nu_r = _nu_norm(jax.tree.map(lambda x: x[0], f.slow))
    if nu_d is not None:
        nu_d = 0.5 * (nu_d[:-1] + nu_d[1:])[:steps]
        nu_r = np.concatenate([np.full(K, np.nan), nu_r])[:steps]

    def train(cats, loss, osc):
        out = []
        for a, b in intervals(cats, steps):
            seg = slice(a, b)
            peak = a + int(np.nanargmax(loss[seg]))
            trough = peak + int(np.nanargmin(osc[peak:b])) if peak < b else peak
            row = dict(step=a, peak=float(loss[peak]), trough_step=trough, trough=float(osc[trough]))
            if nu_d is not None:
                row["slow_ratio_at_trough"] = float(nu_r[trough] / nu_d[trough])
            out.append(row)
        return out

    return dict(cell=cell, problem=pname, optimizer=name, hyperparameters=hp, start_step=K, steps=steps,
                construction=rod, discrete=train(d_cat, D, amp), rod=train(r_cat, L, half),
                wall_s=round(wall, 1))


def print_row(row):
    d, m = row["discrete"], row["rod"]
    print(f"\n{row['cell']} ({row['construction']}, from step {row['start_step']}, {row['steps']} steps, "
          f"{row['wall_s']} s): {len(d)} discrete / {len(m)} rod catapults")
    print("| # | discrete step | rod step | gap D / rod | peak D / rod | trough D / rod | slow rod/D at the rod trough (same step) |")
    print("|---|---|---|---|---|---|---|")
    for i in range(max(len(d), len(m))):
        a = d[i] if i < len(d) else None
        b = m[i] if i < len(m) else None
        gap = lambda t, j: t[j]["step"] - t[j - 1]["step"] if j > 0 and j < len(t) else None  # noqa: E731
        g = f"{gap(d, i) or '-'} / {gap(m, i) or '-'}"
        pk = f"{a['peak']:.3g}" if a else "-", f"{b['peak']:.3g}" if b else "-"
        tr = f"{a['trough']:.1e}" if a else "-", f"{b['trough']:.1e}" if b else "-"
        sr = f"{b['slow_ratio_at_trough']:.4f}" if b and "slow_ratio_at_trough" in b else "-"
        print(f"| {i + 1} | {a['step'] if a else '-'} | {b['step'] if b else '-'} | {g} | {pk[0]} / {pk[1]} | "
              f"{tr[0]} / {tr[1]} | {sr} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS),
                    help="comma list of problem:optimizer[:key=value...][@start]")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    args = ap.parse_args(argv)
    rows = []
    for cell in args.cells.split(","):
        rows.append(run(cell, args.steps))
        print_row(rows[-1])
    if args.out:
        write_json(args.out, dict(machine=platform.platform(), rows=rows))


if __name__ == "__main__":
    main()
