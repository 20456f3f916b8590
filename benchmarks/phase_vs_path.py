"""Is a flow's error a phase error (on the discrete path, early or late) or a different path?

For one cell, the flow centres' relative error against the discrete midpoints is measured three
ways, averaged over steps N-40 .. N-21 (the numbers in the README's fidelity section):

- ``mid``: against the midpoint at the same step (the fidelity suite's error);
- ``smooth W``: against the midpoints averaged over a centred window of W steps (what is left
  if the unmodelled fast oscillation, e.g. momentum ring-down, is removed);
- ``shift S``: against the *closest* midpoint within +-S steps (what is left if timing is free).

    python benchmarks/phase_vs_path.py --problem toy --optimizer heavy_ball
    python benchmarks/phase_vs_path.py --problem mlp-digits --optimizer heavy_ball --momentum 0.9

For heavy ball and Nesterov the inertial rod flow and its stable limit are measured too.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import rodflow_jax as rf  # noqa: E402


def _flat(tree):
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], 1)


def _smooth(x, window):
    h = window // 2
    return np.stack([x[max(0, i - h) : i + h + 1].mean(0) for i in range(len(x))])


def errors(centre, steps, mid, K, windows=(4, 16, 32), shift=40, last=20):
    """``{measure: mean relative error over saved steps N-2*last .. N-last-1}``."""
    sel = slice(-2 * last, -last)
    centre, steps = centre[sel], steps[sel]
    den = np.linalg.norm(mid[steps] - mid[K], axis=1)
    out = {"mid": np.linalg.norm(centre - mid[steps], axis=1) / den}
    for w in windows:
        out[f"smooth{w}"] = np.linalg.norm(centre - _smooth(mid, w)[steps], axis=1) / den
    near = [np.linalg.norm(mid[max(K, k - shift) : k + shift + 1] - c, axis=1).min() for c, k in zip(centre, steps)]
    out[f"shift{shift}"] = np.asarray(near) / den
    return {k: float(np.mean(v)) for k, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="toy")
    ap.add_argument("--optimizer", default="heavy_ball")
    ap.add_argument("--momentum", type=float, default=None)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args(argv)
    problem = rf.get_problem(args.problem)
    hp = {"learning_rate": problem.learning_rates[args.optimizer], **problem.hyperparameters.get(args.optimizer, {})}
    if args.momentum is not None:
        hp["momentum"] = args.momentum
    opt = rf.make_optimizer(args.optimizer, **hp)
    loss_fn, params0 = problem.make(0)
    K = rf.default_start_step(opt)
    run = rf.run_discrete(opt, loss_fn, params0, args.steps)
    W = _flat(run.params)
    mid = 0.5 * (W[:-1] + W[1:])
    z0, s0 = run.state_at(K)
    z1, s1 = run.state_at(K + 1)
    print(f"{args.problem} {args.optimizer} {hp} K={K}")
    kinds = ("rod1", "stable") + (("inertial", "inertial_stable") if opt.momentum_decay() is not None else ())
    for kind in kinds:
        flow, y0 = rf.make_flow(kind, opt, loss_fn, z0, s0, z1, s1)
        fr = rf.integrate(flow, y0, K, args.steps - 1)
        e = errors(_flat(fr.centre), fr.param_steps, mid, K)
        print(f"  {kind:16s}" + "  ".join(f"{k} {v:.3g}" for k, v in e.items()) + ("  (failed)" if fr.failed else ""))


if __name__ == "__main__":
    main()
