"""PNG figures of a comparison: loss, sharpness against the threshold, parameter error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .flows import FLOW_KINDS

COLORS = {
    "discrete": "0.35",
    "stable": "tab:blue",
    "rod": "tab:red",
    "central": "tab:green",
    "inertial": "tab:purple",
    "inertial_stable": "tab:cyan",
}
FLOW_NAMES = FLOW_KINDS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(metrics) -> str:
    opt = metrics["optimizer"]
    hp = ", ".join(f"{k}={v:g}" for k, v in opt.items() if k != "name" and isinstance(v, (int, float)))
    return f"{metrics.get('problem', '')} {opt['name']} ({hp})".strip()


def _loss_panel(ax, traj, metrics):
    step = traj["step"]
    ax.plot(step, traj["discrete_loss"], color=COLORS["discrete"], lw=0.6, alpha=0.5, label="discrete L(z_k)")
    ax.plot(step, traj["discrete_avg_loss"], color=COLORS["discrete"], lw=1.2, label="discrete (L_k+L_k+1)/2")
    for m in FLOW_NAMES:
        if f"{m}_loss" in traj:
            ax.plot(step, traj[f"{m}_loss"], color=COLORS[m], lw=1.2, label=f"{m} flow")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)


def _sharpness_panel(ax, traj, metrics):
    for m in ("discrete", *FLOW_NAMES):
        if f"{m}_sharpness" in traj and len(traj[f"{m}_sharpness_step"]):
            s = np.asarray(traj[f"{m}_sharpness"])
            ax.plot(traj[f"{m}_sharpness_step"], s[:, 0], color=COLORS[m], lw=1.2, label=m)
    if len(traj.get("discrete_sharpness_step", [])):
        ax.plot(traj["discrete_sharpness_step"], traj["discrete_threshold"], "k--", lw=1, label="threshold")
    ax.set_xlabel("step")
    q = metrics.get("threshold_quantity", "sharpness")
    ax.set_ylabel(q)
    ax.legend(fontsize=7)


def _error_panel(ax, traj, metrics):
    for m in FLOW_NAMES:
        key = f"{m}_param_error"
        if key in traj:
            e = np.asarray(traj[key], float)
            ok = np.isfinite(e) & (e > 0)
            ax.plot(traj["step"][ok], e[ok], color=COLORS[m], lw=1.2, label=f"{m} flow")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||centre - mid_k|| / ||mid_k - mid_K||")
    ax.axvline(metrics["start_step"], color="0.7", lw=0.8)
    ax.legend(fontsize=7)


PANELS = {"loss": _loss_panel, "sharpness": _sharpness_panel, "param_error": _error_panel}


def plot_comparison(traj: dict, metrics: dict, out_dir: Path) -> list[Path]:
    """Write ``loss.png``, ``sharpness.png``, ``param_error.png`` and ``summary.png``."""
    plt = _plt()
    out_dir = Path(out_dir)
    written = []
    for name, panel in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        panel(ax, traj, metrics)
        ax.set_title(_title(metrics), fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
        written.append(out_dir / f"{name}.png")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for ax, panel in zip(axes, PANELS.values()):
        panel(ax, traj, metrics)
    fig.suptitle(_title(metrics), fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "summary.png")
    plt.close(fig)
    written.append(out_dir / "summary.png")
    return written
