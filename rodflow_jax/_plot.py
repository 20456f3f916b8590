"""PNG figures of a comparison: loss, sharpness against the threshold, parameter error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .flows import FLOW_KINDS

COLORS = {
    "discrete": "0.35",
    "stable": "tab:blue",
    "rod": "tab:red",
    "rod1": "tab:orange",
    "rod2": "tab:brown",
    "rod2_plain": "tab:olive",
    "central": "tab:green",
    "inertial": "tab:purple",
    "inertial2": "tab:pink",
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
    return f"{metrics.get('problem', '')}: {opt['name']} ({hp})".strip(": ")


def loss_scale(ax, *series) -> None:
    """Log axis only for a positive loss; symlog (linear around 0) for one that goes negative."""
    vals = np.concatenate([np.asarray(x, float).ravel() for x in series])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:  # every run diverged: a log axis with nothing on it cannot place its ticks
        ax.text(0.5, 0.5, "no finite values (diverged)", transform=ax.transAxes, ha="center", va="center",
                fontsize=9, color="0.4")
        return
    if vals.min() > 0:
        ax.set_yscale("log")
        return
    pos = np.abs(vals[vals != 0])
    lt = float(np.percentile(pos, 25)) if pos.size else 1.0
    ax.set_yscale("symlog", linthresh=lt)
    # ticks: 0 and the decades clear of the linear band (no crowd of +-linthresh labels at 0)
    top = np.abs(vals).max()
    ticks = [0.0]
    for e in range(int(np.floor(np.log10(lt))) + 1, int(np.ceil(np.log10(top))) + 1):
        t = 10.0**e
        ticks += [x for x in (t, -t) if vals.min() * 1.5 <= x <= vals.max() * 1.5 or abs(x) <= top]
    ax.set_yticks(sorted(set(ticks)))


def _mark_divergence(ax, metrics) -> None:
    """A dotted line where the discrete run diverged, and one in a flow's colour where that flow
    failed (its solver stalled or ran out of budget: its curves end there)."""
    d = metrics.get("discrete", {})
    if d.get("diverged"):
        ax.axvline(d["diverged_at"], color="red", lw=1.0, ls=":", label=f"discrete diverged at step {d['diverged_at']}")
    for m in FLOW_NAMES:
        f = metrics.get(m) or {}
        # solver_steps 0: a flow that never started (the discrete run diverged before it), not a failure
        if f.get("failed") and f.get("solver_steps") and f.get("failed_at") is not None \
                and f["failed_at"] != d.get("diverged_at"):
            ax.axvline(f["failed_at"], color=COLORS[m], lw=1.0, ls="-.", label=f"{m} flow failed at step {f['failed_at']}")


def _loss_panel(ax, traj, metrics):
    step = traj["step"]
    ax.plot(step, traj["discrete_loss"], color=COLORS["discrete"], lw=0.6, alpha=0.5, label="discrete L(z_k)")
    ax.plot(step, traj["discrete_avg_loss"], color=COLORS["discrete"], lw=1.2, label="discrete (L_k+L_k+1)/2")
    shown = [traj["discrete_loss"]]
    for m in FLOW_NAMES:
        if f"{m}_loss" in traj:
            ax.plot(step, traj[f"{m}_loss"], color=COLORS[m], lw=1.2, label=f"{m} flow")
            shown.append(traj[f"{m}_loss"])
    loss_scale(ax, *shown)
    for m in ("discrete", *FLOW_NAMES):  # catapults: a triangle at each start
        steps = (metrics.get(m) or {}).get("catapult_steps") or []
        key = "discrete_avg_loss" if m == "discrete" else f"{m}_loss"
        if steps and key in traj:
            y = np.asarray(traj[key], float)[np.asarray(steps)]
            ax.plot(steps, y, "v", color=COLORS[m], ms=6, mec="k", mew=0.4,
                    label="catapults" if m == "discrete" else None)
    _mark_divergence(ax, metrics)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)


def _threshold_moves(traj) -> bool:
    t = np.asarray(traj.get("discrete_threshold", []), float)
    t = t[np.isfinite(t)]
    return t.size > 1 and t.max() > 1.01 * t.min()


def _sharpness_panel(ax, traj, metrics):
    """Sharpness against the threshold; as sharpness/threshold (log axis) where the threshold moves."""
    as_ratio = _threshold_moves(traj)
    for m in ("discrete", *FLOW_NAMES):
        if f"{m}_sharpness" in traj and len(traj[f"{m}_sharpness_step"]):
            s = np.asarray(traj[f"{m}_sharpness"], float)[:, 0]
            y = s / np.asarray(traj[f"{m}_threshold"], float) if as_ratio else s
            ax.plot(traj[f"{m}_sharpness_step"], y, color=COLORS[m], lw=1.2, label=m)
    q = metrics.get("threshold_quantity", "sharpness")
    if as_ratio:
        ax.axhline(1.0, color="k", ls="--", lw=1, label="threshold")
        ax.set_yscale("log")
        ax.set_ylabel(f"{q} / threshold")
    else:
        if len(traj.get("discrete_sharpness_step", [])):
            ax.plot(traj["discrete_sharpness_step"], traj["discrete_threshold"], "k--", lw=1, label="threshold")
        ax.set_ylabel(q)
    _mark_divergence(ax, metrics)
    ax.set_xlabel("step")
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
    _mark_divergence(ax, metrics)
    if ax.get_legend_handles_labels()[0]:  # a run with no flow has no error curve to name
        ax.legend(fontsize=7)


PANELS = {"loss": _loss_panel, "sharpness": _sharpness_panel, "param_error": _error_panel}


def plot_comparison(traj: dict, metrics: dict, out_dir: Path, title: str | None = None) -> list[Path]:
    """Write ``loss.png``, ``sharpness.png``, ``param_error.png`` and ``summary.png``."""
    plt = _plt()
    title = title or _title(metrics)
    out_dir = Path(out_dir)
    written = []
    for name, panel in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
        panel(ax, traj, metrics)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
        written.append(out_dir / f"{name}.png")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for ax, panel in zip(axes, PANELS.values()):
        panel(ax, traj, metrics)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "summary.png")
    plt.close(fig)
    written.append(out_dir / "summary.png")
    return written
