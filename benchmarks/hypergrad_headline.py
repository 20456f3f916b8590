"""Headline: the rod-flow hypergradient at the edge of stability vs the discrete optimizer.

GD on the digits MLP, float64, ``--steps`` steps, a grid of ``--num`` learning rates spaced
``delta`` apart around the default 0.2 (the run enters the edge of stability at step ~160).
The objective is the loss averaged over the last ``--window`` steps. For each learning rate:

* rod: d/d(lr) through the rod flow (diffrax, RecursiveCheckpointAdjoint);
* fd:  the finite-difference slope of the *discrete* averaged loss over a learning-rate step
       ten times wider than the grid spacing, ``(A(lr + 5 delta) - A(lr - 5 delta)) / (10 delta)``;
* unrolled: jax.grad through the unrolled discrete run (expected to be erratic at the edge).

Reports sign agreement and |rod - fd| / |fd| <= 30 %, the spread of the unrolled gradient's
magnitude, writes benchmarks/results/hypergrad_headline.json and a figure with the three.

    python benchmarks/hypergrad_headline.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rodflow_jax import hypergradient, make_optimizer  # noqa: E402
from rodflow_jax.experiments import objective_fn  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402
from rodflow_jax.problems import get_problem  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="mlp-digits")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--lr-min", type=float, default=0.16)
    ap.add_argument("--lr-max", type=float, default=0.25)
    ap.add_argument("--out", default="benchmarks/results/hypergrad_headline")
    a = ap.parse_args()
    loss_fn, p0 = get_problem(a.problem).make(0)
    p0 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), p0)
    lrs = np.linspace(a.lr_min, a.lr_max, a.num)
    delta = lrs[1] - lrs[0]
    objective = f"mean_loss_last:{a.window}"
    f_disc = objective_fn(loss_fn, a.steps, objective=objective, model="discrete")

    @eqx.filter_jit
    def disc_value(lr):
        return jax.vmap(lambda x: f_disc(make_optimizer("gd", learning_rate=x), p0))(lr)

    @eqx.filter_jit
    def disc_grad(lr):
        return jax.vmap(jax.grad(lambda x: f_disc(make_optimizer("gd", learning_rate=x), p0)))(lr)

    t = time.perf_counter()
    avg = np.asarray(disc_value(jnp.asarray(lrs)))
    plus = np.asarray(disc_value(jnp.asarray(lrs + 5 * delta)))
    minus = np.asarray(disc_value(jnp.asarray(lrs - 5 * delta)))
    fd = (plus - minus) / (10 * delta)
    unrolled = np.asarray(disc_grad(jnp.asarray(lrs)))
    t_disc = time.perf_counter() - t
    print(f"discrete values, FD and unrolled gradients: {t_disc:.1f} s")

    rod, rod_val, rod_t = [], [], []
    for lr in lrs:
        t = time.perf_counter()
        v, g = hypergradient(loss_fn, p0, make_optimizer("gd", learning_rate=float(lr)), a.steps,
                             objective=objective, model="rod")
        rod.append(g["learning_rate"])
        rod_val.append(v)
        rod_t.append(time.perf_counter() - t)
        print(f"lr {lr:.4f}: rod {g['learning_rate']:+.4g} (A_rod {v:.5g})  fd {fd[len(rod) - 1]:+.4g} "
              f"(A_disc {avg[len(rod) - 1]:.5g})  unrolled {unrolled[len(rod) - 1]:+.4g}  [{rod_t[-1]:.1f} s]")
    rod = np.asarray(rod)
    rel = np.abs(rod - fd) / np.abs(fd)
    sign = np.sign(rod) == np.sign(fd)
    within = sign & (rel <= 0.3)
    mag = np.abs(unrolled)
    summary = {
        "problem": a.problem, "optimizer": "gd", "steps": a.steps, "window": a.window, "float64": True,
        "learning_rates": lrs, "grid_spacing": delta, "fd_width": 10 * delta,
        "discrete_avg_loss": avg, "rod_avg_loss": rod_val,
        "rod_hypergrad": rod, "fd_slope": fd, "unrolled_hypergrad": unrolled,
        "rel_diff_rod_vs_fd": rel, "sign_agree": sign, "within_30pct": within,
        "n_sign_agree": int(sign.sum()), "n_within_30pct": int(within.sum()), "n": int(len(lrs)),
        "median_rel_diff": float(np.median(rel)),
        "unrolled_abs_min": float(mag.min()), "unrolled_abs_max": float(mag.max()),
        "unrolled_abs_max_over_min": float(mag.max() / mag.min()),
        "unrolled_sign_agree_with_fd": int((np.sign(unrolled) == np.sign(fd)).sum()),
        "rod_seconds_per_lr_mean": float(np.mean(rod_t[1:])) if len(rod_t) > 1 else rod_t[0],
        "rod_first_call_seconds": rod_t[0], "discrete_seconds": t_disc,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), summary)
    _figure(lrs, rod, fd, unrolled, avg, rod_val, out.with_suffix(".png"), a)
    print(f"sign agreement {sign.sum()}/{len(lrs)}, within 30 %: {within.sum()}/{len(lrs)}, "
          f"median |rod - fd|/|fd| = {np.median(rel):.3f}")
    print(f"unrolled |d/dlr|: min {mag.min():.3g}, max {mag.max():.3g} (ratio {mag.max() / mag.min():.3g})")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def _figure(lrs, rod, fd, unrolled, avg, rod_val, path, a):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(16, 3.8))
    ax[0].plot(lrs, avg, "o-", ms=3, color="0.35", label="discrete")
    ax[0].plot(lrs, rod_val, "s-", ms=3, color="tab:red", label="rod flow")
    ax[0].set_title(f"loss averaged over the last {a.window} of {a.steps} steps")
    ax[0].legend(fontsize=8)
    ax[1].plot(lrs, rod, "s-", ms=3, color="tab:red")
    ax[1].set_title("rod-flow hypergradient dA/d(lr)")
    ax[2].plot(lrs, fd, "o-", ms=3, color="0.35")
    ax[2].set_title("discrete FD slope (width 10x grid spacing)")
    ax[3].plot(lrs, unrolled, "^-", ms=3, color="tab:purple")
    ax[3].set_title("unrolled discrete hypergradient")
    # one symlog scale for the three derivative panels, linear within the FD slopes' range
    lin = max(1e-3, float(np.max(np.abs(fd))))
    hi = 1.5 * max(np.max(np.abs(rod)), np.max(np.abs(fd)), np.max(np.abs(unrolled)))
    for i in (1, 2, 3):
        ax[i].set_yscale("symlog", linthresh=lin)
        ax[i].set_ylim(-hi, hi)
        ax[i].axhline(0, color="k", lw=0.5)
        ax[i].axhspan(-lin, lin, color="0.9", lw=0)
    for x in ax:
        x.set_xlabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(json_path):
    """Redraw the figure from a written JSON (``python benchmarks/hypergrad_headline.py --replot X.json``)."""
    import json

    d = json.loads(Path(json_path).read_text())
    a = argparse.Namespace(window=d["window"], steps=d["steps"])
    arr = lambda k: np.asarray(d[k], float)  # noqa: E731
    _figure(arr("learning_rates"), arr("rod_hypergrad"), arr("fd_slope"), arr("unrolled_hypergrad"),
            arr("discrete_avg_loss"), arr("rod_avg_loss"), Path(json_path).with_suffix(".png"), a)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--replot":
        replot(sys.argv[2])
    else:
        main()
