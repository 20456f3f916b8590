r"""The records: every metric key defined once, for compare, sweep and the benchmarks alike.

A record is built from the arrays of one configuration of an :class:`~._evaluate.Evaluation`,
so a one-configuration sweep reports exactly what ``compare`` reports. Definitions:

* ``final_loss``: discrete ``L(z_N)`` (None if the run diverged); a flow's predicted
  time-averaged loss at its last step ``N - 1`` (it predicts ``(L(z_{N-1}) + L(z_N))/2``).
* ``mean_loss``: the mean of the same loss over the last 20 % of the steps (the flow's over
  its own last 20 %).
* ``param_rel_error(k) = ||centre(k) - mid_k|| / ||mid_k - mid_K||`` with
  ``mid_k = (z_k + z_{k+1})/2``; ``_final`` at the last grid step, ``_max`` over
  ``k >= K + (N - K)/10``.
* ``loss_rel_error_mean``: mean of ``|flow loss - discrete averaged loss| / |discrete averaged loss|``;
  ``loss_window_log_error``: mean over 50-step windows of ``|log mean(flow) - log mean(discrete)|``.
* ``variance_window_log_error`` (flows that model the oscillation): the same windowed log error
  between the flow's predicted variance (``|r|^2``; the central flow's ``tr Sigma``) and the
  discrete run's drift-free squared half amplitude ``(|z_{k+1} - 2 z_k + z_{k-1}|/4)^2``,
  over the established edge phase only (from the discrete run's first catapult, else from its
  onset): before it the rod's ``r`` and the true oscillation both grow from rounding level, and
  the drift-inclusive half step is not an oscillation at all.
* ``sharpness_*``: the (preconditioned) sharpness the optimizer's threshold bounds, at the
  last probe; ``sharpness_ratio_final`` = sharpness / threshold.
* ``eos_onset_step``: first probed step with sharpness >= 95 % of the threshold;
  ``eos_crossing_step``: first probed step with sharpness >= the threshold (both by
  :func:`~rodflow_jax._metrics.first_upcrossing`). The top-level ``eos_onset_step`` is the
  discrete run's 95 % step.
* ``catapult_steps`` / ``first_catapult_step``: the first step of each loss spike with a
  matching sharpness drop (:func:`~rodflow_jax._catapults.detect_catapults`: the loss rises
  1.5x over its running minimum, spikes within 25 steps are one, and the sharpness drops 5 %
  within 50 steps), in the discrete averaged loss ``(L(z_k) + L(z_{k+1}))/2`` and in each
  flow's predicted loss; a flow adds ``catapult_count_difference`` (flow - discrete),
  ``catapult_mean_timing_error`` (mean |step error| of matched catapults) and
  ``first_catapult_timing_error`` (signed; negative = early).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .. import _metrics as M
from .._catapults import detect_catapults, match_catapults, reference_floor

MEAN_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Record:
    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class ProbeCost(Record):
    probes: int
    hvps: int


@dataclasses.dataclass(frozen=True)
class ModelRecord(Record):
    final_loss: float | None
    mean_loss: float | None
    sharpness_final: float | None
    threshold_final: float | None
    sharpness_ratio_final: float | None
    eos_onset_step: int | None
    eos_crossing_step: int | None
    catapult_steps: list
    first_catapult_step: int | None
    probe_cost: dict


@dataclasses.dataclass(frozen=True)
class DiscreteRecord(ModelRecord):
    diverged: bool
    diverged_at: int | None


@dataclasses.dataclass(frozen=True)
class FlowRecord(ModelRecord):
    flow: str
    param_rel_error_final: float | None
    param_rel_error_max: float | None
    loss_rel_error_mean: float | None
    loss_window_log_error: float | None
    variance_window_log_error: float | None
    failed: bool
    failed_at: int | None
    message: str
    solver_steps: int
    rejected_steps: int
    solver: str | None  # the solver that produced the flow (a retry after a budget hit says so)
    construction: str | None  # the flow that ran: rod1, rod2, inertial, ... (what "rod" resolved to)
    catapult_count_difference: int | None
    catapult_mean_timing_error: float | None
    first_catapult_timing_error: int | None


def _sharpness_fields(steps, eig, thr, hvps) -> dict[str, Any]:
    top = eig[:, 0] if eig.size else np.zeros(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = top / thr
    return dict(
        sharpness_final=M.last_finite(top), threshold_final=M.last_finite(thr),
        sharpness_ratio_final=M.last_finite(r), eos_onset_step=M.eos_onset_step(steps, r),
        eos_crossing_step=M.first_upcrossing(steps, r, 1.0),
        probe_cost=ProbeCost(int(np.isfinite(top).sum()), int(np.sum(hvps[np.isfinite(top)]))).to_json(),
    )


def catapults(loss, steps, eig, probe_steps, floor: float | None = None) -> list[int]:
    sharp = eig[:, 0] if eig.size else np.zeros(0)
    if not np.isfinite(loss).any():
        return []
    return [int(k) for k in detect_catapults(loss, steps, sharpness=sharp, sharpness_steps=probe_steps, floor=floor)]


def discrete_catapults(ev, i: int) -> list[int]:
    return catapults(ev.avg_loss[i], np.arange(ev.num_steps), ev.probes.eigenvalues[i], ev.probe_steps)


def discrete_record(ev, i: int) -> DiscreteRecord:
    loss = ev.loss[i]
    div = int(ev.diverged_at[i])
    cat = discrete_catapults(ev, i)
    return DiscreteRecord(
        final_loss=None if div >= 0 else M.last_finite(loss),
        mean_loss=M.mean_last(loss, MEAN_FRACTION),
        catapult_steps=cat,
        first_catapult_step=cat[0] if cat else None,
        **_sharpness_fields(ev.probe_steps, ev.probes.eigenvalues[i], ev.probes.threshold[i], ev.probes.hvps[i]),
        diverged=div >= 0,
        diverged_at=div if div >= 0 else None,
    )


def flow_record(ev, name: str, i: int) -> FlowRecord:
    f = ev.flows[name]
    K, N = int(ev.starts[i]), ev.num_steps  # this configuration's start (the batch's arrays may begin earlier)
    on, fgrid = ev.flow_steps >= K, ev.flow_grid[ev.flow_grid >= K]
    pon = f.probe_steps >= K
    loss = f.arrays.loss[i][on]
    ts = ev.flow_steps[on]
    avg = ev.avg_loss[i][K:N]
    err = f.param_error[i][ev.flow_grid >= K]
    eig, thr, hvps = f.probes.eigenvalues[i][pon], f.probes.threshold[i][pon], f.probes.hvps[i][pon]
    finite = np.isfinite(loss)
    div = int(ev.diverged_at[i])
    # a configuration whose discrete run diverged at d: its flow is stopped at d - 1 (the last midpoint)
    stopped = div >= 0 and not (~finite & (ts < div - 2)).any()
    message = f.message(i)
    failed = bool(message or not finite.all()) and not stopped
    failed_at = None
    if failed:
        failed_at = int(ts[np.argmin(finite)]) if not finite.all() else int(ts[-1])
    if stopped:
        message = f"stopped at step {div}: the discrete run diverged there"
    note = "" if f.arrays.note is None else str(f.arrays.note[i])
    late = M.late_window(fgrid, K, N)
    lerr = M.loss_rel_error(loss, avg)
    vwin = None
    if ev.predicts_variance(name):
        # the established edge phase: from the discrete run's first catapult (before it the
        # oscillation grows from rounding level, and *when* it does is the catapult-timing
        # metric's business), or from the onset where there is no catapult
        cats = discrete_catapults(ev, i)
        onset = cats[0] if cats else ev.onset(i)
        edge = fgrid >= (onset if onset is not None else N)
        amp2 = M.moving_average(ev.amplitude[i][fgrid] ** 2)
        variance = f.arrays.variance[i][ev.flow_grid >= K]
        vwin = M.windowed_log_loss_error(variance[edge], amp2[edge], window=max(1, 50 // ev.every))
    cat = catapults(loss, ts, eig, f.probe_steps[pon], floor=reference_floor(ev.avg_loss[i], loss))
    ref = [k for k in discrete_catapults(ev, i) if k >= K]
    match = match_catapults(ref, cat)
    return FlowRecord(
        final_loss=M.last_finite(loss[-1:]),
        mean_loss=M.mean_last(loss, MEAN_FRACTION),
        catapult_steps=cat,
        first_catapult_step=cat[0] if cat else None,
        catapult_count_difference=int(match.count_difference),
        catapult_mean_timing_error=match.mean_timing_error,
        first_catapult_timing_error=match.first_timing_error,
        **_sharpness_fields(f.probe_steps[pon], eig, thr, hvps),
        flow=name,
        param_rel_error_final=M.last_finite(err),
        param_rel_error_max=M.nan_max(err[late]),
        loss_rel_error_mean=float(np.nanmean(lerr)) if np.isfinite(lerr).any() else None,
        loss_window_log_error=M.windowed_log_loss_error(loss, avg),
        variance_window_log_error=vwin,
        failed=failed,
        failed_at=failed_at,
        # a stopped or failed fallback also says why it ran (its note: "rod2 ran out of ...")
        message="; ".join(m for m in (message, note) if m) if (failed or stopped) else note,
        solver_steps=int(f.arrays.num_steps[i]),
        rejected_steps=int(f.arrays.num_rejected_steps[i]),
        solver=None if f.arrays.solver is None else str(f.arrays.solver[i]),
        construction=None if f.arrays.construction is None else str(f.arrays.construction[i]),
    )


def missing_flow(name: str, start_step: int, message: str) -> FlowRecord:
    """The record of a flow that could not start (its discrete run diverged before step K + 1)."""
    none = {f.name: None for f in dataclasses.fields(FlowRecord)}
    return FlowRecord(**{**none, "flow": name, "probe_cost": ProbeCost(0, 0).to_json(), "catapult_steps": [],
                         "failed": True,
                         "failed_at": start_step, "message": message, "solver_steps": 0, "rejected_steps": 0})


def start_note(probe_steps, ratio, start_step: int, threshold_quantity: str, asked: int | None = None) -> str:
    """For a run that starts far past its edge (:func:`~rodflow_jax._metrics.after_initial_transient`),
    the note that says where its initial transient ends and whether the flows, started at
    ``start_step``, start inside it; ``asked``: the start step asked for, where the flows were
    moved from it to the transient's end (``start_step="auto"``); else ``""``."""
    end = M.after_initial_transient(probe_steps, ratio)
    if end is None or (end <= start_step and asked is None):
        return ""
    head = (f"the run starts past its edge ({threshold_quantity} {float(ratio[0]):.3g}x the threshold at step 0) "
            f"and is back under it at step {end}")
    if asked is not None:
        return head + f": the flows start there, after that initial transient (--start-step {asked} starts them inside it)"
    return head + (f": the flows from step {start_step} start inside that initial transient (--start-step {end} starts "
                   "them after it)")


def run_record(ev, i: int, models) -> dict[str, Any]:
    """The record of configuration ``i``: what metrics.json holds and what a sweep row holds."""
    d = discrete_record(ev, i)
    out: dict[str, Any] = {
        "num_steps": ev.num_steps,
        "start_step": int(ev.starts[i]),
        "num_params": ev.num_params,
        "threshold_quantity": ev.threshold_quantity,
        "threshold": d.threshold_final,
        "eos_onset_step": d.eos_onset_step,
        "eos_crossing_step": d.eos_crossing_step,
        "eos_fraction": M.eos_fraction(ev.probe_steps, ev.ratio(i)),
        "first_catapult_step": d.first_catapult_step,
        "discrete": d.to_json(),
    }
    moved = int(ev.starts[i]) > ev.start_step
    note = start_note(ev.probe_steps, ev.ratio(i), int(ev.starts[i]), ev.threshold_quantity,
                      asked=ev.start_step if moved else None)
    if note:
        out["start_note"] = note
    for name in models:
        if name in ev.flows and ev.started(i):  # alone or in any batch, the same record
            out[name] = flow_record(ev, name, i).to_json()
        elif name != "discrete":
            out[name] = missing_flow(name, int(ev.starts[i]), "the discrete run diverged before the start step").to_json()
    for a, b, key in (("stable", "rod", "error_ratio"), ("central", "rod", "central_rod_error_ratio")):
        if a in out and b in out:
            out[f"{key}_final"] = M.ratio(out[a]["param_rel_error_final"], out[b]["param_rel_error_final"])
            out[f"{key}_max"] = M.ratio(out[a]["param_rel_error_max"], out[b]["param_rel_error_max"])
    return out
