"""Where a stiff stable flow's cost goes as it sharpens: the implicit solve in windows.

The stable flow of an adaptive optimizer is integrated with the default stiff solver
(:func:`rodflow_jax._integrate.stiff_solver`: Kvaerno5 + Newton-Krylov on Jacobian-vector
products) from the default start step, ``--window`` simulated steps at a time, each window
continuing from the last one's end state. Per window: solver steps (accepted + rejected), rejected
steps, vector-field evaluations (one per Newton iteration, counted by host callbacks), GMRES solves
and their Jacobian-vector products, and wall time (the first window includes compilation).

    python benchmarks/stiff_growth.py --problem cnn-digits --optimizer scalar_adam --end 600 --window 50 \\
        --out benchmarks/results/stiff_growth_cnn_scalar_adam.json
    # the step-size controller's effect on one late window (diffrax's I controller: 0, 1)
    python benchmarks/stiff_growth.py --problem mlp-digits --optimizer scalar_adam --start 450 --end 600 \\
        --window 150 --pcoeff 0 --icoeff 1
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stiff as S  # noqa: E402  (its counting flow and GMRES)

import rodflow_jax as rf  # noqa: E402
from rodflow_jax import _integrate as I  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402


def stable_flow_at_start(prob, optimizer_name):
    """The stable flow of ``optimizer_name`` (at ``prob``'s defaults) and its state at the default
    start step K, the loss and the start step."""
    loss_fn, params0 = prob.make(0)
    opt = S._optimizer(prob, optimizer_name).prepared(params0)
    K = rf.default_start_step(opt)
    disc = rf.run_discrete(opt, loss_fn, params0, K + 1, save_steps=[K, K + 1])
    (z0, s0), (_, s1) = disc.state_at(K), disc.state_at(K + 1)
    flow, y = rf.stable_flow(opt, loss_fn, z0, s0, s1)
    return flow, y, K


def windowed_solve(flow, cfg, window_steps):
    """A compiled ``(y, t0, t1) -> (y(t1), solver steps, rejected steps, result code, loss)``: the
    solve of one window of at most ``window_steps`` simulated steps with ``cfg``."""

    @eqx.filter_jit
    def window(y, t0, t1):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(flow.vector_field), cfg.solver, t0=t0, t1=t1, dt0=None, y0=y,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=cfg.controller(),
            max_steps=cfg.max_steps(window_steps), throw=False)
        yy = jax.tree.map(lambda a: a[0], sol.ys)
        return yy, sol.stats["num_steps"], sol.stats["num_rejected_steps"], sol.result._value, flow.predicted_loss(yy)

    return window


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="cnn-digits")
    ap.add_argument("--optimizer", default="scalar_adam")
    ap.add_argument("--end", type=int, default=600, help="last simulated step")
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--start", type=int, default=None,
                    help="first counted step (default: the start step K; K..start is solved uncounted with the default)")
    ap.add_argument("--pcoeff", type=float, default=None, help="the step-size controller's (default: stiff_solver's)")
    ap.add_argument("--icoeff", type=float, default=None)
    ap.add_argument("--rtol", type=float, default=None, help="the solve's (default: stiff_solver's)")
    ap.add_argument("--atol", type=float, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    flow, y, K = stable_flow_at_start(rf.get_problem(args.problem), args.optimizer)
    default = I.stiff_solver(jnp.float64)
    t = K
    if args.start is not None and args.start > K:
        y = windowed_solve(flow, default, args.start - K)(y, float(K), float(args.start))[0]
        t = args.start
    flow = S.CountingStableFlow(flow.optimizer, flow.loss_fn, flow.scale)
    cfg = S._counting(dataclasses.replace(
        default, pcoeff=default.pcoeff if args.pcoeff is None else args.pcoeff,
        icoeff=default.icoeff if args.icoeff is None else args.icoeff,
        rtol=default.rtol if args.rtol is None else args.rtol, atol=default.atol if args.atol is None else args.atol))
    W = args.window
    window = windowed_solve(flow, cfg, W)

    rows = []
    out = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                       "device": str(jax.devices()[0])},
           "problem": args.problem, "optimizer": args.optimizer, "start_step": K, "window": W,
           "solver": I.solver_name(cfg), "rtol": cfg.rtol, "atol": cfg.atol, "pcoeff": cfg.pcoeff,
           "icoeff": cfg.icoeff, "rows": rows}
    print("| steps | solver steps | rejected | Newton iterations / solver step | JVPs / GMRES solve | wall s |")
    print("|---|---|---|---|---|---|")
    while t < args.end:
        for k in S.COUNT:
            S.COUNT[k] = 0
        w0 = time.perf_counter()
        y, ns, nr, res, loss = jax.block_until_ready(window(y, float(t), float(min(t + W, args.end))))
        c = dict(S.COUNT)
        row = dict(t0=t, t1=min(t + W, args.end), solver_steps=int(ns), rejected=int(nr),
                   message=I.result_message(int(res)), loss=float(loss), wall_s=time.perf_counter() - w0,
                   vf=c["vf"], jvp=c["jvp"], solves=c["solves"])
        rows.append(row)
        print(f"| {row['t0']}-{row['t1']} | {row['solver_steps']} | {row['rejected']} | "
              f"{row['vf'] / max(row['solver_steps'], 1):.1f} | {row['jvp'] / max(row['solves'], 1):.1f} | "
              f"{row['wall_s']:.1f} |", flush=True)
        if args.out:
            write_json(args.out, out)
        if row["message"]:
            print("stopped:", row["message"])
            break
        t += W
    return out


if __name__ == "__main__":
    main()
