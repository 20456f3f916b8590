"""PNG figures of a sweep: final loss and sharpness/threshold against a hyperparameter."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ._plot import COLORS, _plt, loss_scale
from .flows import FLOW_KINDS


def _x_name(records) -> str:
    """The swept hyperparameter on the x axis: the one with the most distinct values."""
    names = list(records[0]["hyperparameters"])
    return max(names, key=lambda n: len({r["hyperparameters"][n] for r in records}))


def _band(records, model, key, x_name):
    """x values, and the median/min/max over seeds (and any other hyperparameters) of ``key``."""
    xs = sorted({r["hyperparameters"][x_name] for r in records})
    med, lo, hi = [], [], []
    for x in xs:
        v = [r.get(model, {}).get(key) for r in records if r["hyperparameters"][x_name] == x]
        v = np.asarray([np.nan if e is None else e for e in v], float)
        ok = v[np.isfinite(v)]
        med.append(np.median(ok) if ok.size else np.nan)
        lo.append(ok.min() if ok.size else np.nan)
        hi.append(ok.max() if ok.size else np.nan)
    return np.asarray(xs), np.asarray(med), np.asarray(lo), np.asarray(hi)


def _mark_diverged(ax, records, x_name) -> None:
    """A red x at the top of the axes at each value where a discrete run diverged: its row has no
    final value, so the curve would otherwise just skip it (or its seed band narrow) unexplained."""
    xs = [r["hyperparameters"][x_name] for r in records if r.get("discrete", {}).get("diverged")]
    if xs:
        n = len(xs)
        ax.plot(sorted(set(xs)), [0.97] * len(set(xs)), "x", color="red", ms=7, mew=1.5, clip_on=False,
                transform=ax.get_xaxis_transform(), label=f"discrete diverged ({n} run{'s' * (n > 1)})")


def plot_sweep(records, out_dir, title: str = "") -> list[Path]:
    """``sweep_loss.png`` and ``sweep_sharpness.png``: one curve per model, seeds as bands."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    if not records[0]["hyperparameters"]:  # the problem's defaults alone: one point per seed
        records = [{**r, "hyperparameters": {"seed": float(r["seed"])}} for r in records]
    x_name = _x_name(records)
    models = [m for m in ("discrete", *FLOW_KINDS) if m in records[0]]
    written = []
    for key, fname, ylabel, log in (
        ("final_loss", "sweep_loss.png", "final loss", True),
        ("sharpness_ratio_final", "sweep_sharpness.png", "sharpness / threshold (final)", False),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        shown = []
        for m in models:
            xs, med, lo, hi = _band(records, m, key, x_name)
            ax.plot(xs, med, "o-", ms=3, color=COLORS[m], label=m)
            ax.fill_between(xs, lo, hi, color=COLORS[m], alpha=0.2, lw=0)
            shown.append(med)
        if key == "sharpness_ratio_final":
            ax.axhline(1.0, color="k", lw=0.6, ls="--", label="threshold")
        _mark_diverged(ax, records, x_name)
        x = np.asarray([r["hyperparameters"][x_name] for r in records], float)
        if np.all(x > 0) and x.max() > 10 * x.min():
            ax.set_xscale("log")
        else:
            ax.xaxis.set_major_locator(MaxNLocator(6))
        if log:
            loss_scale(ax, *shown)
        ax.set_title(f"{title}: {ylabel} against {x_name}" if title else ylabel, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel(x_name)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        written.append(out_dir / fname)
    return written
