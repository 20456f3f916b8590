"""Fidelity suite: rod flow vs stable flow for the nine optimizers on five problems.

For every cell (problem x optimizer, at the problem's default hyperparameters, where the
discrete run is at the edge of stability for most of its steps) the flows are started twice
from the discrete state: at the default start step K (``start_step="auto"``, what ``rodflow
compare`` does: ``rf.default_start_step``, 0 for GD and the RMSProps, ``ceil(10/(1-beta))``
past the momentum/bias-correction transient otherwise, or later where a run that starts far
past its edge ends its initial transient) and shortly before the edge (``K = onset - pre``).
The flow recipe is the same in every cell.

    python benchmarks/fidelity.py --out benchmarks/results/fidelity.json        # full grid
    python benchmarks/fidelity.py --quick --out /tmp/fidelity_quick.json         # CI size
    python benchmarks/fidelity.py --problems mlp-digits --optimizers gd,adam     # a subset
    python benchmarks/fidelity.py --jobs 2 --order-from OLD.json ...              # longest cells first
    python benchmarks/fidelity.py --jobs 2 --momentum own,0.9 ...                 # + the momentum-0.9 cells, one pool
    python benchmarks/fidelity.py --derivative fd ...                             # rod2 by a forward difference

Writes a JSON list (one object per cell and start) and prints the markdown table that the
README shows; ``--figures DIR`` also draws one figure per optimizer family.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import rodflow_jax as rf  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402
from rodflow_jax.flows._second_order import DERIVATIVES  # noqa: E402

PROBLEMS = ["toy", "deep-linear", "mlp-digits", "cnn-digits", "transformer-sort"]
OPTIMIZERS = list(rf.OPTIMIZERS)
QUICK = {
    "problems": ["mlp-digits"],
    "optimizers": ["gd", "heavy_ball", "rmsprop", "adam"],
    "steps": 600,
    "starts": ("pre_edge",),
}
FAMILIES = {
    "gd": ["gd"],
    "momentum": ["heavy_ball", "nesterov"],
    "rmsprop": ["rmsprop", "scalar_rmsprop"],
    "adam": ["adam", "scalar_adam", "nadam", "scalar_nadam"],
}
PRE_EDGE = 0.05  # the pre-edge start sits this fraction of the run before the onset


def pre_edge_start(default_start: int, onset: int, steps: int) -> int:
    """The grid's pre-edge start: ``PRE_EDGE * steps`` before the discrete onset, not before the
    default start."""
    return max(default_start, onset - int(math.ceil(PRE_EDGE * steps)))


def make_cell_optimizer(problem, name, overrides=None):
    hp = {"learning_rate": problem.learning_rates[name], **problem.hyperparameters.get(name, {})}
    hp.update(overrides or {})
    return rf.make_optimizer(name, **hp), hp


# Momentum 0.9 against the problems' defaults (tuned at 0.5): Nesterov's rate is scaled so that
# its threshold (2+2b)/(eta(1+2b)) is unchanged; heavy ball at the same threshold diverges on
# mlp-digits (step 180), so it keeps its rate (threshold 12.7 instead of 10).
MOMENTUM_09_LR_FACTOR = {"heavy_ball": 1.0, "nesterov": 0.905}


def momentum_overrides(problem, name, momentum):
    if momentum is None or name not in MOMENTUM_09_LR_FACTOR:
        return None
    factor = MOMENTUM_09_LR_FACTOR[name] if momentum == 0.9 else 1.0
    return {"momentum": momentum, "learning_rate": problem.learning_rates[name] * factor}


def parse_momenta(spec):
    """``--momentum``: ``None`` (the problems' own), or a comma list of values, ``own`` for the
    problems' own (``"own,0.9"``: the main cells and the momentum-0.9 ones in one pool)."""
    if spec is None:
        return [None]
    try:
        return [None if m.strip() == "own" else float(m) for m in str(spec).split(",")]
    except ValueError:
        raise SystemExit(f"--momentum: expected numbers or 'own', got {spec!r}") from None


def grid_tasks(problems, optimizers, momenta):
    """The grid's cells as ``{(problem, optimizer, momentum): "problem label"}``, in order; a
    momentum that does not change a cell (an optimizer without momentum) gives it once."""
    tasks = {}
    for pname in problems:
        problem = rf.get_problem(pname)
        for name in optimizers:
            for m in momenta:
                overrides = momentum_overrides(problem, name, m)
                cell = f"{pname} {_label(name, make_cell_optimizer(problem, name, overrides)[1])}"
                if cell not in tasks.values():
                    tasks[(pname, name, m if overrides else None)] = cell
    return tasks


def _window_mean(x, mask):
    x = np.asarray(x, float)[mask]
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else None


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def oscillation_stats(loss_fn, params0, optimizer, num_steps, start, run=None):
    """Period-2 purity and amplitude of the discrete oscillation from step ``start`` on.

    With ``d_k = z_{k+1} - z_k``, the high-passed steps ``f_k = (2 d_k - d_{k-1} - d_{k+1})/4``
    (gain 1 at period 2, 0 for the slow drift) give

    - ``step_alternation = -mean cos(f_k, f_{k+1})``: 1 for a period-2 oscillation,
      ``-cos(omega)`` at frequency ``omega``, about 0 for the period-4 rotations of underdamped
      momentum modes, which a rod (two points) cannot describe;
    - ``alternating_amplitude = mean |z_{k+1} - 2 z_k + z_{k-1}| / 4`` over the second half: the
      half-width of a period-2 oscillation with the drift removed (the half-step
      ``|z_{k+1} - z_k|/2`` also counts the drift, which dominates for the adaptive methods).
    """
    if run is None or len(run.saved_steps) < num_steps + 1:  # a comparison's run keeps every step unless too large
        run = rf.run_discrete(optimizer, loss_fn, params0, num_steps)
    flat = np.concatenate([np.asarray(x).reshape(num_steps + 1, -1) for x in jax.tree.leaves(run.params)], 1)
    with np.errstate(all="ignore"):
        d = np.diff(flat[start:], axis=0)
        f = (2 * d[1:-1] - d[:-2] - d[2:]) / 4
        cos = np.sum(f[:-1] * f[1:], 1) / (np.linalg.norm(f[:-1], axis=1) * np.linalg.norm(f[1:], axis=1))
        second = np.linalg.norm(np.diff(flat, 2, axis=0), axis=1) / 4  # centred on steps 1..N-1
    cos = cos[np.isfinite(cos)]
    late = np.arange(1, num_steps) >= start + (num_steps - start) // 2
    return {
        "step_alternation": float(-cos.mean()) if cos.size else None,
        "discrete_alternating_amplitude": _window_mean(second, late),
        "discrete_midpoint_sharpness_ratio": midpoint_sharpness_ratio(loss_fn, optimizer, run, start, num_steps),
    }


_sharpness = eqx.filter_jit(rf.optimizer_sharpness)  # compiled once per cell, not per probe


def midpoint_sharpness_ratio(loss_fn, optimizer, run, start, num_steps, probes=10):
    """Mean (preconditioned) sharpness / threshold at the discrete *midpoints*
    ``((z_k + z_{k+1})/2, (s_k + s_{k+1})/2)`` over ``probes`` steps of the second half of the
    edge phase: the point a flow's centre models (the discrete probes sit at the orbit's ends)."""
    if run.diverged:
        return None
    first = start + (num_steps - start) // 2
    ratios = []
    for k in np.unique(np.linspace(first, num_steps - 1, probes).astype(int)):
        (z0, s0), (z1, s1) = run.state_at(int(k)), run.state_at(int(k) + 1)
        mid = jax.tree.map(lambda a, b: 0.5 * (a + b), (z0.params, s0), (z1.params, s1))
        probe = _sharpness(optimizer, loss_fn, mid[0], mid[1])
        ratios.append(float(probe.eigenvalues[0] / probe.threshold))
    return float(np.mean(ratios))


def summarise(problem, name, hp, cmp, start_kind, wall, osc):
    """One JSON row from a :class:`rf.Comparison`."""
    m, t = cmp.metrics, cmp.trajectories
    K, N = m["start_step"], m["num_steps"]
    nan = np.full(N + 1, np.nan)  # a run that diverged before the start has no flow trajectories
    steps = t["step"]
    onset = m["eos_onset_step"]
    ratio_d = t["discrete_sharpness"][:, 0] / t["discrete_threshold"]
    at_edge = t["discrete_sharpness_step"] >= (onset if onset is not None else N + 1)
    late = (steps >= K + (N - K) // 2) & (steps < N)
    ref = t["discrete_avg_loss"]
    row = {
        "problem": problem.name,
        "optimizer": name,
        "hyperparameters": hp,
        "num_steps": N,
        "start": start_kind,
        "start_step": K,
        "eos_onset_step": onset,
        "eos_fraction": m["eos_fraction"],
        "discrete_sharpness_ratio": _window_mean(ratio_d, at_edge),
        "discrete_diverged_at": m["discrete"]["diverged_at"],
        "discrete_amplitude": _window_mean(t.get("discrete_half_norm", nan), late),
        "eos_crossing_step": m["discrete"].get("eos_crossing_step"),
        "discrete_catapult_steps": m["discrete"].get("catapult_steps"),
        "wall_s": round(wall, 1),
    }
    span = (steps >= K) & (steps < N)
    ref_mean = _window_mean(ref, span & np.isfinite(ref))
    for flow in rf.FLOWS:
        if flow not in m:
            continue
        e = m[flow]
        row[f"{flow}_error_final"] = e.get("param_rel_error_final")
        row[f"{flow}_error_max"] = e.get("param_rel_error_max")
        row[f"{flow}_loss_error"] = e.get("loss_rel_error_mean")
        row[f"{flow}_loss_window_log_error"] = e.get("loss_window_log_error")
        pred = t.get(f"{flow}_loss")
        ok = span & np.isfinite(ref) & (np.isfinite(pred) if pred is not None else False)
        pm, rm = _window_mean(pred, ok) if pred is not None else None, _window_mean(ref, ok)
        row[f"{flow}_mean_loss_error"] = abs(pm - rm) / abs(rm) if pm is not None and rm else None
        row[f"{flow}_sharpness_ratio"] = e.get("sharpness_ratio_final")
        row[f"{flow}_failed_at"] = e.get("failed_at") if e.get("failed") else None
        row[f"{flow}_message"] = e.get("message") or None
        row[f"{flow}_solver_steps"] = e.get("solver_steps")
        row[f"{flow}_solver"] = e.get("solver")
        row[f"{flow}_construction"] = e.get("construction")
        for key in ("catapult_steps", "catapult_count_difference", "catapult_mean_timing_error",
                    "first_catapult_timing_error"):
            row[f"{flow}_{key}"] = e.get(key)
        row[f"{flow}_wall_s"] = cmp.timings.get(flow)
    row["discrete_mean_loss"] = ref_mean
    row["rod_amplitude"] = _window_mean(t.get("rod_half_norm", nan), late)
    row["amplitude_ratio"] = _ratio(row["rod_amplitude"], row["discrete_amplitude"])
    for k, v in osc.items():
        row[k] = v
    row["alternating_amplitude_ratio"] = _ratio(row["rod_amplitude"], osc["discrete_alternating_amplitude"])
    row["error_ratio_final"] = _ratio(row.get("stable_error_final"), row.get("rod_error_final"))
    row["error_ratio_max"] = _ratio(row.get("stable_error_max"), row.get("rod_error_max"))
    if "inertial" in m:
        row["inertial_amplitude"] = _window_mean(t.get("inertial_half_norm", nan), late)
        row["inertial_alternating_amplitude_ratio"] = _ratio(row["inertial_amplitude"], osc["discrete_alternating_amplitude"])
        row["stable_inertial_error_ratio_final"] = _ratio(row.get("stable_error_final"), row["inertial_error_final"])
        row["rod_inertial_error_ratio_final"] = _ratio(row.get("rod_error_final"), row["inertial_error_final"])
    if "central" in m:
        row["central_rod_error_ratio_final"] = _ratio(row["central_error_final"], row["rod_error_final"])
        for flow in ("rod", "central"):
            row[f"{flow}_variance_window_log_error"] = m[flow].get("variance_window_log_error")
    return row


def derivative_options(models, optimizer, derivative):
    """``flow_options`` that make each second-order model in ``models`` (``"rod"`` where it runs
    one for ``optimizer``) evaluate its correction by ``derivative`` (``None``: their default)."""
    if derivative is None:
        return None
    from rodflow_jax.flows._registry import resolve

    second = [m for m in models if m in rf.FLOWS and rf.FLOWS[resolve(m, optimizer)].second_order]
    return {m: {"derivative": derivative} for m in second}


def run_cell(problem, name, steps=None, *, overrides=None, starts=("default", "pre_edge"),
             models=("discrete", "stable", "rod"), progress=False, probe_every=None, derivative=None):
    """Rows for one cell, one per start: ``default`` (``start_step="auto"``) and
    ``pre_edge`` (``PRE_EDGE * steps`` before the discrete onset; skipped where it would not
    come after the default start); ``starts=("counted",)``: the flows from the start the targets count
    alone (the pre-edge one where there is one, else the default one). ``derivative``: how the second-order rods evaluate their
    correction (``rodflow_jax.flows._second_order.DERIVATIVES``; recorded on the rows when
    given). Returns ``(rows, {start: Comparison})``."""
    loss_fn, params0 = problem.make(0)
    opt, hp = make_cell_optimizer(problem, name, overrides)
    if rf.FLOWS["inertial"].supports(opt) is not None:  # the inertial flows exist for the momentum methods only
        models = [m for m in models if not m.startswith("inertial")]
    steps = steps or problem.default_steps
    kw = dict(probe_every=probe_every or max(1, steps // 50), progress=progress,
              flow_options=derivative_options(models, opt, derivative))
    cmps, walls = {}, {}
    t = time.perf_counter()
    first = rf.compare(loss_fn, params0, opt, steps, start_step="auto",
                       models=models if "default" in starts else ["discrete"], keep_discrete=True, **kw)
    K0 = first.metrics["start_step"]
    if "default" in starts:
        cmps["default"], walls["default"] = first, time.perf_counter() - t
    onset = first.metrics["eos_onset_step"]
    if starts == ("counted",):  # the flows from the start the targets count alone: pre-edge where it is after K0
        K = pre_edge_start(K0, onset, steps) if onset is not None else K0
        kind = "pre_edge" if K0 < K <= steps - 2 else "default"
        t = time.perf_counter()
        cmps[kind] = rf.compare(loss_fn, params0, opt, steps, start_step=K if kind == "pre_edge" else "auto",
                                models=models, reuse=first, **kw)
        walls[kind] = time.perf_counter() - t
    if "pre_edge" in starts and onset is not None:
        K = pre_edge_start(K0, onset, steps)
        if (K > K0 or "default" not in starts) and K <= steps - 2:
            t = time.perf_counter()
            cmps["pre_edge"] = rf.compare(loss_fn, params0, opt, steps, start_step=K, models=models, reuse=first, **kw)
            walls["pre_edge"] = time.perf_counter() - t
    osc = oscillation_stats(loss_fn, params0, opt, steps, onset if onset is not None else K0, first.discrete.run())
    if "default" in starts:  # its run is not kept past the cell (nor pickled to the parent: it holds the loss)
        cmps["default"] = dataclasses.replace(first, discrete=None, source=None)
    rows = [summarise(problem, name, hp, c, kind, walls[kind], osc) for kind, c in cmps.items()]
    if kw["flow_options"]:
        for r in rows:
            r["derivative"] = derivative
    return rows, cmps


def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def _abs(x):
    return None if x is None else abs(x)


def _cell_key(r):
    """A cell: problem, optimizer and its hyperparameters (the starts are its rows)."""
    return r["problem"], r["optimizer"], json.dumps(r["hyperparameters"], sort_keys=True)


def _label(name, hp) -> str:
    return name + (f" (b={hp['momentum']:g})" if "momentum" in hp else "")


def _mid(row) -> str:
    m = row.get("discrete_midpoint_sharpness_ratio")
    return "" if m is None else f" (mid {m:.2f})"


def markdown_table(rows) -> str:
    """One line per cell (problem, optimizer, hyperparameters); "a / b" = default / pre-edge start."""
    rows = [r for r in rows if "stable_error_final" in r and "rod_error_final" in r]  # stable-vs-rod rows
    cells: dict = {}
    for r in rows:
        cells.setdefault(_cell_key(r), {})[r["start"]] = r
    head = [
        "problem", "optimizer", "K", "onset", "at edge", "stable err", "rod err", "ratio final",
        "ratio max", "mean-loss err stable / rod", "sharpness/thr disc / stable / rod",
        "rod amp / disc (half-step, alternating)", "period-2 purity",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def both(starts, key, spec):
        return " / ".join(_fmt(r[key], spec) for r in starts)

    for (problem, name, hp_json), by_start in cells.items():
        starts = [by_start[k] for k in ("default", "pre_edge") if k in by_start]
        r = starts[0]
        label = _label(name, json.loads(hp_json))
        stable_err = both(starts, "stable_error_final", ".3g")
        failed = [x["stable_failed_at"] for x in starts if x["stable_failed_at"] is not None]
        if failed:
            stable_err += f" (failed @{failed[0]})"
        lines.append("| " + " | ".join([
            problem, label, " / ".join(str(x["start_step"]) for x in starts),
            _fmt(r["eos_onset_step"], "d") if r["eos_onset_step"] is not None else "-",
            _fmt(r["eos_fraction"], ".2f"), stable_err, both(starts, "rod_error_final", ".3g"),
            both(starts, "error_ratio_final", ".1f"), both(starts, "error_ratio_max", ".1f"),
            f"{_fmt(_abs(r['stable_mean_loss_error']), '.2f')} / {_fmt(_abs(r['rod_mean_loss_error']), '.2f')}",
            f"{_fmt(r['discrete_sharpness_ratio'], '.2f')}{_mid(r)} / {_fmt(r['stable_sharpness_ratio'], '.2f')} / {_fmt(r['rod_sharpness_ratio'], '.2f')}",
            f"{_fmt(r['amplitude_ratio'], '.2f')}, {_fmt(r['alternating_amplitude_ratio'], '.2f')}",
            _fmt(r["step_alternation"], ".2f"),
        ]) + " |")
    return "\n".join(lines)


def summary_counts(rows) -> str:
    """The README's counts, each cell once (its pre-edge start where it has one)."""
    rows = [r for r in rows if "stable_error_final" in r and "rod_error_final" in r]  # stable-vs-rod rows
    cells: dict = {}
    for r in rows:
        if _cell_key(r) not in cells or r["start"] == "pre_edge":
            cells[_cell_key(r)] = r
    rs = list(cells.values())
    edge = [r for r in rs if (r["eos_fraction"] or 0) >= 0.5]
    ratio = [r.get("error_ratio_final") or 0 for r in edge]
    near = lambda x: x is not None and abs(x - 1) <= 0.05  # noqa: E731
    loss_ok = lambda f: sum(1 for r in rs if r.get(f"{f}_mean_loss_error") is not None and abs(r[f"{f}_mean_loss_error"]) <= 0.05)  # noqa: E731
    disc = lambda r: r.get("discrete_midpoint_sharpness_ratio") or r.get("discrete_sharpness_ratio")  # noqa: E731
    where = [r for r in rs if near(disc(r))]
    return (
        f"{len(rs)} cells; {len(edge)} at the edge for >= half their probes; among those, stable/rod "
        f">= 3 in {sum(x >= 3 for x in ratio)} and >= 10 in {sum(x >= 10 for x in ratio)}; rod sharpness "
        f"within 5 % of the threshold in {sum(near(r.get('rod_sharpness_ratio')) for r in rs)}/{len(rs)}, and in "
        f"{sum(near(r.get('rod_sharpness_ratio')) for r in where)} of the {len(where)} where the discrete one is "
        "(at the midpoints where probed there); "
        f"mean loss within 5 %: rod {loss_ok('rod')}/{len(rs)}, stable {loss_ok('stable')}/{len(rs)}"
    )


def _as_rod1(row):
    """A row that ran ``rod1`` by name but no ``rod`` reads as a stable-vs-rod row too (its rod
    is the first-order one, as in the rows from before the constructions)."""
    if "rod_error_final" in row or "rod1_error_final" not in row:
        return row
    row = dict(row)
    for k in [k for k in row if k.startswith("rod1_")]:
        row["rod_" + k[len("rod1_"):]] = row[k]
    row["rod_construction"] = "rod1"
    row["error_ratio_final"] = _ratio(row.get("stable_error_final"), row.get("rod_error_final"))
    row["error_ratio_max"] = _ratio(row.get("stable_error_max"), row.get("rod_error_max"))
    return row


def construction_of(row, flow: str) -> str:
    """The rod construction a row's ``flow`` ran: ``rod`` rows before the constructions existed
    (no ``rod_construction`` key) are the first-order rod."""
    return (row.get(f"{flow}_construction") or "rod1") if flow == "rod" else flow


CONSTRUCTIONS = ("rod1", "rod2", "rod2_plain", "inertial", "inertial2")


def relabel(row, old: str, new: str) -> dict:
    """``row`` with the construction ``old`` read as ``new`` (its ``old_*`` keys, and a ``rod`` that
    ran ``old``): rows saved before a construction changed keep their meaning
    (``--table-from FILE:rod2=rod2_plain``: ``rod2`` before the exact growth along ``r``)."""
    out = {}
    for k, v in row.items():
        if k.startswith(old + "_") and not k.startswith(new + "_"):
            k = new + k[len(old):]
        out[k] = v
    if out.get("rod_construction") == old:
        out["rod_construction"] = new
    return out


def load_rows(spec: str) -> list[dict]:
    """The rows of ``FILE`` or ``FILE:OLD=NEW[,OLD=NEW]`` (see :func:`relabel`)."""
    path, _, labels = spec.partition(":") if ":" in spec and "=" in spec.rsplit(":", 1)[1] else (spec, "", "")
    rows = json.loads(Path(path).read_text())
    for pair in filter(None, labels.split(",")):
        old, new = pair.split("=")
        rows = [relabel(r, old, new) for r in rows]
    return rows


def by_construction(rows) -> dict:
    """``{(problem, optimizer, hyperparameters, start): {construction: metrics}}`` over every
    file's rows (a later row of the same cell and construction wins); ``"row"`` is the cell's
    first row that ran the stable flow (else its first row)."""
    cells: dict = {}
    keys = ("error_final", "error_max", "catapult_steps", "catapult_count_difference",
            "first_catapult_timing_error", "catapult_mean_timing_error", "solver_steps", "wall_s", "failed_at",
            "message")
    for r in rows:
        cell = cells.setdefault(_cell_key(r) + (r["start"],), {"row": r})
        if cell["row"].get("stable_error_final") is None and r.get("stable_error_final") is not None:
            cell["row"] = r  # the cell's row is one with the stable flow (a pass may have run only rods)
        for flow in ("rod", *CONSTRUCTIONS):
            if r.get(f"{flow}_error_final", "absent") == "absent":
                continue
            c = construction_of(r, flow)
            cell[c] = {k: r.get(f"{flow}_{k}") for k in keys}
    return cells


def _on_time(disc, model) -> bool:
    """The first catapult within max(3 % of its step, 15 steps) (``rodflow_jax._catapults``)."""
    from rodflow_jax._catapults import FIRST_RELATIVE

    return bool(disc and model) and abs(model[0] - disc[0]) <= max(FIRST_RELATIVE * disc[0], 15)


def construction_scores(rows, constructions=CONSTRUCTIONS) -> dict:
    """Per optimizer and construction, over the at-edge cells (>= half the probes at the edge,
    no divergence) where every construction that ran for that optimizer ran (paired): geometric-mean final and max error, first catapults on time / cells whose discrete run
    catapults after the start, catapult counts equal, and the number of cells. Cells where the
    discrete run diverged or a construction failed count that construction's error as 1."""
    out: dict = {}
    cells = by_construction(rows)
    ran: dict = {}  # optimizer -> the constructions that ran for it anywhere
    for (problem, name, hp, start), cell in cells.items():
        ran.setdefault(name, set()).update(c for c in constructions if c in cell)
    for (problem, name, hp, start), cell in cells.items():
        r = cell["row"]
        if r.get("discrete_diverged_at") is not None or (r.get("eos_fraction") or 0) < 0.5:
            continue  # the at-edge cells only
        if not ran[name] <= set(cell):
            continue  # paired: only cells where every construction of this optimizer ran
        K = r["start_step"]
        disc = [k for k in (r.get("discrete_catapult_steps") or []) if k >= K]
        for c in constructions:
            if c not in cell:
                continue
            e = cell[c]
            s = out.setdefault(name, {}).setdefault(c, {"cells": 0, "log_final": 0.0, "log_max": 0.0,
                                                        "catapult_cells": 0, "first_on_time": 0, "count_equal": 0})
            s["cells"] += 1
            s["log_final"] += math.log(min(max(e["error_final"] or 1.0, 1e-12), 10.0))
            s["log_max"] += math.log(min(max(e["error_max"] or 1.0, 1e-12), 10.0))
            if disc:
                s["catapult_cells"] += 1
                model = [k for k in (e["catapult_steps"] or []) if k >= K]
                s["first_on_time"] += _on_time(disc, model)
                s["count_equal"] += len(model) == len(disc)
    for name, per in out.items():
        for c, s in per.items():
            n = max(s["cells"], 1)
            s["final_gmean"] = math.exp(s.pop("log_final") / n)
            s["max_gmean"] = math.exp(s.pop("log_max") / n)
    return out


def default_of(row) -> str:
    """The construction ``--models rod`` runs for a row's optimizer now."""
    from rodflow_jax.flows._registry import default_construction

    return default_construction(rf.make_optimizer(row["optimizer"], **row["hyperparameters"]))


def targets(rows) -> str:
    """The catapult issue's targets over the at-edge cells (each cell's pre-edge start where it
    has one), for the default construction, and for the first-order rod it replaced over the
    cells that ran it too (a pass of the default models alone has no ``rod1``)."""
    cells: dict = {}
    for key, cell in by_construction(rows).items():
        r = cell["row"]
        if r.get("discrete_diverged_at") is not None or (r.get("eos_fraction") or 0) < 0.5:
            continue
        ck = key[:3]
        if ck not in cells or key[3] == "pre_edge":
            cells[ck] = cell
    stat = {"cells": 0, "catapult_cells": 0, "on_time": 0, "same_count": 0, "ratio10": 0, "max3": 0,
            "worse": [], "ratio10_rod1": 0, "max3_rod1": 0, "on_time_rod1": 0, "same_count_rod1": 0, "missing": 0,
            "cells_rod1": 0, "catapult_cells_rod1": 0}
    for (problem, name, hp), cell in cells.items():
        r = cell["row"]
        c = default_of(r)
        if c not in cell or r.get("stable_error_final") is None:
            stat["missing"] += 1
            continue
        has_rod1 = "rod1" in cell
        stat["cells"] += 1
        stat["cells_rod1"] += has_rod1
        K = r["start_step"]
        disc = [k for k in (r.get("discrete_catapult_steps") or []) if k >= K]
        for tag, e in (("", cell[c]), *((("_rod1", cell["rod1"]),) if has_rod1 else ())):
            fin, mx = e["error_final"] or np.inf, e["error_max"] or np.inf
            stat["ratio10" + tag] += (r["stable_error_final"] or 0) >= 10 * fin
            stat["max3" + tag] += (r.get("stable_error_max") or 0) >= 3 * mx
            if disc:
                model = [k for k in (e["catapult_steps"] or []) if k >= K]
                stat["on_time" + tag] += _on_time(disc, model)
                stat["same_count" + tag] += len(model) == len(disc)
        stat["catapult_cells"] += bool(disc)
        stat["catapult_cells_rod1"] += bool(disc) and has_rod1
        if has_rod1 and (cell[c]["error_final"] or np.inf) > 1.1 * (cell["rod1"]["error_final"] or np.inf):
            stat["worse"].append(f"{problem} {name} ({c} {_fmt(cell[c]['error_final'], '.3g')} vs rod1 "
                                 f"{_fmt(cell['rod1']['error_final'], '.3g')})")
    n, cc, n1, cc1 = stat["cells"], stat["catapult_cells"], stat["cells_rod1"], stat["catapult_cells_rod1"]
    return (f"{n} at-edge cells with the default construction ({stat['missing']} without), {n1} of them with rod1 "
            f"too; {cc} catapult after the start ({cc1} with rod1). Default / rod1: first catapult on time "
            f"{stat['on_time']}/{cc} / {stat['on_time_rod1']}/{cc1}; same count {stat['same_count']}/{cc} / "
            f"{stat['same_count_rod1']}/{cc1}; stable/rod final >= 10 in {stat['ratio10']}/{n} / "
            f"{stat['ratio10_rod1']}/{n1}; max >= 3 in {stat['max3']}/{n} / {stat['max3_rod1']}/{n1}; cells > 10 % "
            f"worse than rod1 (final error): {len(stat['worse'])}"
            + (": " + "; ".join(stat["worse"]) if stat["worse"] else ""))


def constructions_table(rows) -> str:
    """One line per cell: final / max error and catapults (first, count) of each construction."""
    head = ["problem", "optimizer", "K", "discrete catapults", *[f"{c}: final / max err, catapults (dt first)" for c in CONSTRUCTIONS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (problem, name, hp, start), cell in by_construction(rows).items():
        r = cell["row"]
        K = r["start_step"]
        disc = [k for k in (r.get("discrete_catapult_steps") or []) if k >= K]
        cols = []
        for c in CONSTRUCTIONS:
            e = cell.get(c)
            if e is None:
                cols.append("-")
                continue
            model = [k for k in (e["catapult_steps"] or []) if k >= K]
            dt = f", {model[0] - disc[0]:+d}" if disc and model else ""
            fail = " (failed)" if e.get("failed_at") is not None else ""
            cols.append(f"{_fmt(e['error_final'], '.3g')} / {_fmt(e['error_max'], '.3g')}, {len(model)}{dt}{fail}")
        lines.append("| " + " | ".join([problem, _label(name, json.loads(hp)), str(K), str(len(disc)) + (f" (first {disc[0]})" if disc else ""), *cols]) + " |")
    return "\n".join(lines)


def scores_table(rows) -> str:
    """Per optimizer: each construction's geometric-mean errors and catapult timing."""
    head = ["optimizer", "construction", "cells", "final err (gmean)", "max err (gmean)", "first catapult on time", "same count"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, per in construction_scores(rows).items():
        for c, s in per.items():
            cc = s["catapult_cells"]
            lines.append("| " + " | ".join([name, c, str(s["cells"]), _fmt(s["final_gmean"], ".3g"), _fmt(s["max_gmean"], ".3g"),
                                             f"{s['first_on_time']}/{cc}", f"{s['count_equal']}/{cc}"]) + " |")
    return "\n".join(lines)


def inertial_table(rows) -> str:
    """Rows that ran the inertial flows: first-order against second-order (inertial) models."""
    head = [
        "problem", "optimizer", "K", "param err stable / rod / inertial stable / inertial", "stable / inertial",
        "rod / inertial", "mean-loss err rod / inertial", "sharpness/thr disc / rod / inertial",
        "amp / disc alternating rod, inertial",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "inertial_error_final" not in r:
            continue
        label = _label(r["optimizer"], r["hyperparameters"])
        lines.append("| " + " | ".join([
            r["problem"], label, str(r["start_step"]),
            " / ".join(_fmt(r.get(f"{f}_error_final"), ".3g") for f in ("stable", "rod", "inertial_stable", "inertial")),
            _fmt(r.get("stable_inertial_error_ratio_final"), ".1f"), _fmt(r.get("rod_inertial_error_ratio_final"), ".1f"),
            " / ".join(_fmt(_abs(r.get(f"{f}_mean_loss_error")), ".3f") for f in ("rod", "inertial")),
            " / ".join(_fmt(r.get(k), ".2f") for k in ("discrete_sharpness_ratio", "rod_sharpness_ratio", "inertial_sharpness_ratio")),
            ", ".join(_fmt(r.get(k), ".2f") for k in ("alternating_amplitude_ratio", "inertial_alternating_amplitude_ratio")),
        ]) + " |")
    return "\n".join(lines)


def schedule_makespan(costs, jobs: int) -> float:
    """Wall time of ``costs`` (seconds per task) on ``jobs`` workers that each take the next task
    as they free up, longest first (the order ``--jobs`` gets when the costliest problems are
    listed first)."""
    free = [0.0] * max(1, jobs)
    for c in sorted(costs, reverse=True):
        i = free.index(min(free))
        free[i] += c
    return max(free)


def cell_costs(rows) -> dict:
    """``{"problem label": {"problem", "wall", "models", "starts"}}``: each cell's seconds (its
    rows' ``cell_share_s``, or ``wall_s`` for rows saved before that key) and its models' walls."""
    cells: dict = {}
    for r in rows:
        name = f"{r['problem']} {_label(r['optimizer'], r['hyperparameters'])}"
        c = cells.setdefault(name, {"problem": r["problem"], "wall": 0.0, "models": {}, "starts": []})
        c["wall"] += r.get("cell_share_s") or r.get("wall_s") or 0.0
        c["starts"].append(r["start"])
        for k, v in r.items():
            if k.endswith("_wall_s") and v:
                c["models"][k[:-7]] = c["models"].get(k[:-7], 0.0) + v
    return cells


def longest_first(tasks, labels, rows):
    """``tasks`` reordered by the cells' walls in ``rows`` (saved passes), longest first, so the
    ``--jobs`` workers end together; ``labels[i]`` is task i's cell name ("problem label"). Cells
    with no saved wall go first (they may be the longest), in their listed order."""
    wall = {k: c["wall"] for k, c in cell_costs(rows).items()}
    order = sorted(range(len(tasks)), key=lambda i: (labels[i] in wall, -wall.get(labels[i], 0.0), i))
    return [tasks[i] for i in order]


def cost_table(rows, jobs: int = 2, top: int = 10) -> str:
    """Where the grid's time goes, from the rows' own walls: the sum of a cell's rows'
    ``cell_share_s`` (each row's compare and its part of the cell's oscillation statistics), or
    ``wall_s`` (the compare alone) for rows saved before that key, so a cell whose starts were run
    in different passes adds up; seconds per problem, the costliest cells with their costliest
    model, and the longest-first makespan on ``jobs`` workers. Rows measured under load or in
    different sessions add up as they were measured."""
    cells = cell_costs(rows)
    total = sum(c["wall"] for c in cells.values())
    per_problem: dict = {}
    for c in cells.values():
        per_problem[c["problem"]] = per_problem.get(c["problem"], 0.0) + c["wall"]
    lines = [f"cells: {len(cells)}, compare time {total:.0f} s; on {jobs} workers, longest first: "
             f"{schedule_makespan([c['wall'] for c in cells.values()], jobs) / 60:.0f} min",
             "", "| problem | compare s | share |", "|---|---|---|"]
    lines += [f"| {p} | {w:.0f} | {w / total:.0%} |" for p, w in sorted(per_problem.items(), key=lambda x: -x[1])]
    lines += ["", "| costliest cells | starts | compare s | costliest model (s) |", "|---|---|---|---|"]
    for name, c in sorted(cells.items(), key=lambda x: -x[1]["wall"])[:top]:
        model = max(c["models"].items(), key=lambda x: x[1], default=("-", 0.0))
        lines.append(f"| {name} | {', '.join(c['starts'])} | {c['wall']:.0f} | {model[0]} ({model[1]:.0f}) |")
    return "\n".join(lines)


def central_table(rows) -> str:
    """Rows that ran the central flow: stable vs rod vs central, side by side."""
    head = [
        "problem", "optimizer", "K", "param err stable / rod / central", "mean-loss err stable / rod / central",
        "sharpness/thr disc / rod / central", "variance log-err rod / central", "wall s rod / central",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "central_error_final" not in r:
            continue
        three = lambda key, spec: " / ".join(_fmt(_abs(r.get(f"{f}_{key}")), spec) for f in ("stable", "rod", "central"))  # noqa: E731
        lines.append("| " + " | ".join([
            r["problem"], r["optimizer"], str(r["start_step"]), three("error_final", ".3g"),
            three("mean_loss_error", ".2f"),
            " / ".join(_fmt(r.get(k), ".2f") for k in ("discrete_sharpness_ratio", "rod_sharpness_ratio", "central_sharpness_ratio")),
            " / ".join(_fmt(r.get(f"{f}_variance_window_log_error"), ".2f") for f in ("rod", "central")),
            " / ".join(_fmt(r.get(f"{f}_wall_s"), ".0f") for f in ("rod", "central")),
        ]) + " |")
    return "\n".join(lines)


def plot_family(family, results, out_path, problem_name=""):
    """Loss, sharpness/threshold and parameter error over steps for one optimizer family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in FAMILIES[family] if n in results]
    if not names:
        return
    fig, axes = plt.subplots(3, len(names), figsize=(4.2 * len(names), 8.5), squeeze=False)
    colours = {"discrete": "0.3", "stable": "tab:blue", "rod": "tab:red"}
    for j, name in enumerate(names):
        t = results[name].trajectories
        K = results[name].metrics["start_step"]
        ax = axes[0, j]
        ax.plot(t["step"], t["discrete_avg_loss"], color=colours["discrete"], lw=0.8, label="discrete (L_k+L_k+1)/2")
        for f in ("stable", "rod"):
            if f"{f}_loss" in t:
                ax.plot(t["step"], t[f"{f}_loss"], color=colours[f], lw=1.2, label=f)
        ax.set_yscale("log")
        ax.set_title(f"{name} (K={K})")
        ax.set_ylabel("loss")
        ax = axes[1, j]
        for f in ("discrete", "stable", "rod"):
            if f"{f}_sharpness" in t:
                ax.plot(t[f"{f}_sharpness_step"], t[f"{f}_sharpness"][:, 0] / t[f"{f}_threshold"], color=colours[f], lw=1.2, label=f)
        ax.axhline(1.0, color="k", ls=":", lw=0.8)
        ax.set_ylabel("sharpness / threshold")
        ax.set_yscale("log")
        ax = axes[2, j]
        for f in ("stable", "rod"):
            if f"{f}_param_error" in t:
                e = t[f"{f}_param_error"]
                ok = np.isfinite(e)
                ax.plot(t["step"][ok], e[ok], color=colours[f], lw=1.2, label=f)
        ax.set_yscale("log")
        ax.set_ylabel("rel. parameter error")
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    axes[2, 0].legend(fontsize=8)
    fig.suptitle(f"{family}: discrete vs stable flow vs rod flow ({problem_name})")
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    plt.close(fig)


def _cell_task(pname, name, momentum, steps, starts, models, progress, probe_every, keep, derivative=None):
    """One cell in a worker: ``(pname, name, momentum, rows, comparisons kept for figures, wall s)``."""
    t = time.perf_counter()
    problem = rf.get_problem(pname)
    cell_rows, cmps = run_cell(problem, name, steps, overrides=momentum_overrides(problem, name, momentum),
                               starts=starts, models=models, progress=progress, probe_every=probe_every,
                               derivative=derivative)
    return pname, name, momentum, cell_rows, (cmps if pname == keep else {}), time.perf_counter() - t


def _run_cells(tasks, cell_kw, jobs, keep):
    """Yield finished cells: in order with ``jobs == 1``, as they finish with ``jobs`` worker
    processes (each its own JAX runtime; on a GPU they share it, with preallocation off)."""
    if jobs == 1:
        for task in tasks:
            yield _cell_task(*task, **cell_kw, keep=keep)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_cell_task, *task, **cell_kw, keep=keep) for task in tasks]
        for f in cf.as_completed(futures):
            yield f.result()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI size: %s" % QUICK)
    ap.add_argument("--problems", default=None, help="comma list (default: all five)")
    ap.add_argument("--optimizers", default=None, help="comma list (default: all nine)")
    ap.add_argument("--steps", type=int, default=None, help="steps per cell (default: the problem's)")
    ap.add_argument("--out", default=None, help="JSON file for the rows")
    ap.add_argument("--figures", default=None, help="folder for one PNG per optimizer family")
    ap.add_argument("--figure-problem", default="mlp-digits")
    ap.add_argument("--starts", default=None, help="comma list of default,pre_edge (default: both)")
    ap.add_argument("--models", default="discrete,stable,rod", help="comma list; add inertial,inertial_stable (momentum methods) or central")
    ap.add_argument("--momentum", default=None,
                    help="override heavy ball/Nesterov momentum (e.g. 0.9); a comma list runs each value, "
                         "'own' for the problem's (own,0.9: the main and the momentum-0.9 cells in one pool)")
    ap.add_argument("--table-from", nargs="+", default=None,
                    help="print the table from JSON files, run nothing (FILE:rod2=rod2_plain reads a file's rod2 as rod2_plain)")
    ap.add_argument("--probe-every", type=int, default=None, help="sharpness probe interval (default: steps // 50)")
    ap.add_argument("--jobs", type=int, default=1, help="cells run in this many worker processes (default 1)")
    ap.add_argument("--order-from", nargs="+", default=None,
                    help="run the cells longest first, by their walls in these saved JSON files")
    ap.add_argument("--derivative", default=None, choices=DERIVATIVES,
                    help="how the second-order rods evaluate their correction (default: theirs, jvp)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    if args.table_from:
        rows = [_as_rod1(r) for f in args.table_from for r in load_rows(f)]
        print(markdown_table(rows))
        print("\n" + summary_counts(rows))
        if any("central_error_final" in r for r in rows):
            print("\n" + central_table(rows))
        if any("inertial_error_final" in r for r in rows):
            print("\n" + inertial_table(rows))
        print("\n" + constructions_table(rows))
        print("\n" + scores_table(rows))
        print("\n" + targets(rows))
        print("\n" + cost_table(rows, args.jobs))
        return rows
    problems = QUICK["problems"] if args.quick else PROBLEMS
    optimizers = QUICK["optimizers"] if args.quick else OPTIMIZERS
    steps = args.steps or (QUICK["steps"] if args.quick else None)
    if args.problems:
        problems = args.problems.split(",")
    if args.optimizers:
        optimizers = args.optimizers.split(",")
    starts = tuple(args.starts.split(",")) if args.starts else (QUICK["starts"] if args.quick else ("default", "pre_edge"))
    if args.jobs > 1:  # before any backend starts: workers share the device
        import os

        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {platform.processor() or platform.machine()}", flush=True)
    rows, for_figures = [], {}
    t_all = time.perf_counter()
    label = grid_tasks(problems, optimizers, parse_momenta(args.momentum))  # {(problem, optimizer, momentum): cell}
    tasks = list(label)
    if args.order_from:
        tasks = longest_first(tasks, [label[t] for t in tasks], [r for f in args.order_from for r in load_rows(f)])
    rank = {label[t]: i for i, t in enumerate(tasks)}
    cell_kw = dict(steps=steps, starts=starts, models=tuple(args.models.split(",")),
                   progress=args.progress and args.jobs == 1, probe_every=args.probe_every, derivative=args.derivative)
    for pname, name, momentum, cell_rows, cmps, wall in _run_cells(tasks, cell_kw, args.jobs, keep=args.figure_problem if args.figures else None):
        overhead = (wall - sum(r["wall_s"] for r in cell_rows)) / max(1, len(cell_rows))
        for r in cell_rows:  # the row's share of the cell: its compare, and its part of the statistics
            r["cell_share_s"] = round(r["wall_s"] + overhead, 1)
        rows.extend(cell_rows)
        if cmps and (name not in for_figures or momentum is None):  # a figure shows the problem's own momentum
            for_figures[name] = next(iter(cmps.values()))
        for r in cell_rows:
            print(
                f"{pname:16s} {_label(name, r['hyperparameters']):22s} K={r['start_step']:4d} onset={r['eos_onset_step']} "
                + " ".join(f"{f}={_fmt(r[f'{f}_error_final'])}" for f in rf.FLOWS if f"{f}_error_final" in r)
                + f" ratio={_fmt(r['error_ratio_final'], '.1f')}"
                + f" ({wall:.0f} s)",
                flush=True,
            )
        if args.out:  # written after every cell, so a long run leaves its partial results
            write_json(Path(args.out), rows)
    rows.sort(key=lambda r: rank.get(f"{r['problem']} {_label(r['optimizer'], r['hyperparameters'])}", len(rank)))
    if args.out:
        write_json(Path(args.out), rows)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s ({args.jobs} job(s))\n")
    print(markdown_table(rows))
    print("\n" + summary_counts(rows))
    if any("central_error_final" in r for r in rows):
        print("\n" + central_table(rows))
    if any("inertial_error_final" in r for r in rows):
        print("\n" + inertial_table(rows))
    print("\n" + cost_table(rows, args.jobs))
    if args.figures:
        Path(args.figures).mkdir(parents=True, exist_ok=True)
        for family in FAMILIES:
            plot_family(family, for_figures, Path(args.figures) / f"fidelity_{family}.png", args.figure_problem)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
