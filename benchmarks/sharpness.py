"""Cost and accuracy of the sharpness probes.

For the MLP, CNN and transformer problems (float64, at the state after half the default GD run,
i.e. at the edge of stability): the wall time of one Hessian-vector product relative to one
gradient; the Lanczos iterations and wall time needed for 1e-4 and 1e-6 relative accuracy on
the top eigenvalue (and on each of the top 3) against dense ``eigh``. Then a 50,000-parameter
MLP: GD for 1,000 steps with the sharpness probed every 10 steps (Lanczos, warm-started), and
the probes' overhead relative to the discrete run.

    python benchmarks/sharpness.py --out benchmarks/results/sharpness.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import rodflow_jax as rf  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402
from rodflow_jax.problems import digits_data, init_mlp, mlp_apply, mse_loss  # noqa: E402

ITERS = (5, 10, 15, 20, 25, 30, 40, 60)


def _time(f, *args, repeat=5):
    jax.block_until_ready(f(*args))  # compile
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - t)
    return best


def _state(name):
    prob = rf.get_problem(name)
    loss_fn, params0 = prob.make(0)
    opt = rf.make_optimizer("gd", learning_rate=prob.learning_rates["gd"])
    k = prob.default_steps // 2
    run = rf.run_discrete(opt, loss_fn, params0, k, save_steps=[k])
    return loss_fn, run.state_at(k)[0].params


def probe_costs(name):
    loss_fn, params = _state(name)
    x, unravel = ravel_pytree(params)
    n = x.shape[0]
    f = lambda v: loss_fn(unravel(v))  # noqa: E731
    grad = jax.jit(jax.grad(f))
    hvp = jax.jit(lambda v: jax.jvp(jax.grad(f), (x,), (v,))[1])
    v = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    t_grad = _time(grad, x)
    t_hvp = _time(hvp, v)
    # products with the linearisation reused, as Lanczos takes them
    m = 20

    def reuse_fn(v):
        lin = jax.linearize(jax.grad(f), x)[1]  # linearise once, then m products
        return jax.lax.fori_loop(0, m, lambda i, u: lin(u) * 1e-3, v)

    reuse = jax.jit(reuse_fn)
    t_reuse = _time(reuse, v) / m
    # the dense reference is expensive (n HVPs and an n x n eigh): compile, then run it once
    dense = jax.jit(lambda p: rf.top_eigenvalues(loss_fn, p, 3, method="dense")).lower(params).compile()
    t = time.perf_counter()
    ref = np.asarray(jax.block_until_ready(dense(params)))
    dense_t = time.perf_counter() - t
    acc = []
    for it in ITERS:
        g = jax.jit(lambda p, it=it: rf.top_eigenvalues(loss_fn, p, 3, method="lanczos", num_iter=it))
        got = np.asarray(g(params))
        acc.append({
            "iterations": it,
            "top1_rel_error": float(abs(got[0] - ref[0]) / abs(ref[0])),
            "top3_rel_error": float(np.max(np.abs(got - ref) / np.abs(ref))),
            "wall_s": _time(g, params, repeat=3),
        })

    def first(key, tol):
        for a in acc:
            if a[key] <= tol:
                return {"iterations": a["iterations"], "wall_s": a["wall_s"]}
        return None

    return {
        "problem": name,
        "num_params": n,
        "grad_s": t_grad,
        "hvp_s": t_hvp,
        "hvp_over_grad": t_hvp / t_grad,
        "hvp_reused_linearisation_over_grad": t_reuse / t_grad,
        "dense_eigh_s": dense_t,
        "top_eigenvalues": ref.tolist(),
        "lanczos": acc,
        "top1_1e-4": first("top1_rel_error", 1e-4),
        "top1_1e-6": first("top1_rel_error", 1e-6),
        "top3_1e-4": first("top3_rel_error", 1e-4),
        "top3_1e-6": first("top3_rel_error", 1e-6),
    }


def wide_mlp_trajectory(width=768, steps=1000, every=10, num_iter=30):
    x, y, _ = digits_data(500, 0.0)
    params0 = init_mlp(jax.random.PRNGKey(0), sizes=(64, width, 10))
    loss_fn = lambda p: mse_loss(mlp_apply(p, x), y)  # noqa: E731
    n = sum(int(v.size) for v in jax.tree.leaves(params0))
    lam0 = float(rf.top_eigenvalues(loss_fn, params0, 1, method="lanczos", num_iter=40)[0])
    lr = 2.0 / (1.5 * lam0)  # the sharpness must grow 1.5x to reach 2/lr
    opt = rf.make_optimizer("gd", learning_rate=lr)
    save = np.arange(0, steps + 1, every)
    rf.run_discrete(opt, loss_fn, params0, 20)  # compile
    t = time.perf_counter()
    run = rf.run_discrete(opt, loss_fn, params0, steps, save_steps=save)
    t_disc = time.perf_counter() - t
    probe = jax.jit(lambda p, v0: rf.optimizer_sharpness(opt, loss_fn, p, rf.Slow(jnp.zeros(())), 1, "lanczos",
                                                         num_iter=num_iter, v0=v0))
    p0 = run.state_at(0)[0].params
    first = probe(p0, None)
    jax.block_until_ready(probe(p0, first.vectors))  # compile both paths
    sharp, v0 = [], None
    t = time.perf_counter()
    for k in save:
        out = probe(run.state_at(int(k))[0].params, v0)
        v0 = out.vectors
        sharp.append(float(out.eigenvalues[0]))
    t_probe = time.perf_counter() - t
    ratio = np.array(sharp) * lr / 2
    onset = rf._metrics.eos_onset_step(save, ratio)
    return {
        "num_params": n,
        "learning_rate": lr,
        "steps": steps,
        "probe_every": every,
        "lanczos_iterations": num_iter,
        "discrete_s": t_disc,
        "probes_s": t_probe,
        "probe_overhead": t_probe / t_disc,
        "eos_onset_step": onset,
        "sharpness_over_threshold": {"first": ratio[0], "max": float(ratio.max()), "last": ratio[-1]},
        "sharpness": sharp,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="mlp-digits,cnn-digits,transformer-sort")
    ap.add_argument("--out", default="benchmarks/results/sharpness.json")
    ap.add_argument("--skip-wide", action="store_true")
    args = ap.parse_args()
    rows = [probe_costs(p) for p in args.problems.split(",")]
    print("| problem | params | HVP / grad | HVP (linearised) / grad | top-1 1e-4 | top-1 1e-6 | top-3 1e-4 | top-3 1e-6 | dense eigh |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda d: "-" if d is None else f"{d['iterations']} it, {1e3 * d['wall_s']:.1f} ms"  # noqa: E731
    for r in rows:
        print(f"| {r['problem']} | {r['num_params']} | {r['hvp_over_grad']:.2f} | {r['hvp_reused_linearisation_over_grad']:.2f} "
              f"| {fmt(r['top1_1e-4'])} | {fmt(r['top1_1e-6'])} | {fmt(r['top3_1e-4'])} | {fmt(r['top3_1e-6'])} "
              f"| {1e3 * r['dense_eigh_s']:.0f} ms |")
    result = {"machine": f"{platform.machine()} cpus={jax.device_count()} {jax.devices()[0].device_kind}",
              "jax": jax.__version__, "probes": rows}
    if not args.skip_wide:
        w = wide_mlp_trajectory()
        result["wide_mlp"] = w
        print(f"\nwide MLP ({w['num_params']} params), GD lr {w['learning_rate']:.3g}, {w['steps']} steps, probe every "
              f"{w['probe_every']} ({w['lanczos_iterations']} Lanczos its, warm-started): discrete {w['discrete_s']:.1f} s, "
              f"probes {w['probes_s']:.1f} s, overhead {w['probe_overhead']:.2f}x; EoS onset {w['eos_onset_step']}; "
              f"sharpness/threshold {w['sharpness_over_threshold']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
