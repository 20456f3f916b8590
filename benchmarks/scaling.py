"""How the cost of each model grows with the number of parameters.

Models: tanh MLPs 64-h-10 of growing width h on 500 sklearn digits (MSE; h = 32 is the built-in
``mlp-digits``), and the built-in one-block transformer (``transformer-sort``, 256 sequences) at
d_model 16 and 64 (d_mlp = 2 d_model), built from the problems module's own
``init_transformer``/``transformer_apply``. The small CNN (``cnn-digits``, channels c/2c) is sized
the same way, ``--families mlp,transformer,cnn``; it is not in the default because XLA's CPU
convolutions are slow (channels 24/48, 18k parameters: 0.22 s per GD step, 12 minutes for its
float32 row alone). Each model's GD learning rate is
its problem's default scaled by ``lambda_0(base) / lambda_0(model)``, so every size starts at
the same sharpness/threshold ratio as the built-in problem (0.40 for the MLP).

For each size, precision and model (GD discrete optimizer, GD stable flow, GD rod flow, the
inertial rod flow of heavy ball at momentum 0.9 and the same rate, and the sharpness probe) it
measures, through the engine kernels that ``compare`` and ``sweep`` run (a batch of one):

* wall time per simulated step: the compiled call (the first call, compile included, is reported
  beside it; a compiled call under 10 s is repeated, up to 3 calls, and the fastest kept). Beside
  it, one gradient's time (the fastest of at least 5 compiled calls) and each model's time per
  step in gradients, a cross-check that is less exposed to other jobs on the machine; The flows integrate ``--steps`` steps from step 0; the discrete run makes
  ``--steps`` steps; the probe is 8 Lanczos probes along the discrete run, each warm-started from
  the previous one (the first one cold), and its time is per probe;
* gradient evaluations per simulated step: 1 for the discrete optimizer; for a flow
  ``g (6 n + 1) / steps`` with ``n`` diffrax's ``num_steps`` (accepted + rejected) from the
  Solution, 6 new Tsit5 stages per attempted step (FSAL) plus one at the start, and ``g`` the
  gradients per vector-field evaluation (counted: 1 stable, 2 rod, 2 inertial). The count is
  checked once per flow against gradient calls counted at run time (``count_checks``). The save
  points add ``l`` forward losses per step (1 stable, 2 rod and inertial), not counted as
  gradients. For a probe: Hessian-vector products (``ProbeArrays.hvps``);
* peak memory: ``memory_stats()`` of the device where it has them (GPU: ``peak_bytes_in_use``
  after the call minus ``bytes_in_use`` before; a process-lifetime peak, so a call below an
  earlier peak reads that earlier peak, flagged), else on Linux the resident-set high-water mark
  VmHWM, reset before each call through ``/proc/self/clear_refs``, minus VmRSS before it, else
  the ``ru_maxrss`` delta. ``memory_method`` says which.

It fits the log-log slope of time per step against parameters for each family and model, and
extrapolates, from the measured MLP costs, the largest MLP that a 1,000-step default
``rodflow compare`` (discrete + stable + rod and their probes, on compare's own probe grid)
finishes in 10 minutes on this machine.

    python benchmarks/scaling.py                              # everything: 25 minutes on 2 busy CPU cores
    python benchmarks/scaling.py --sizes 2.4k,10k --dtypes float32 --families mlp
    python benchmarks/scaling.py --tiny --out /tmp/scaling_tiny.json   # seconds-long dry run
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import re
import resource
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import rodflow_jax as rf
from rodflow_jax._discrete import states_at
from rodflow_jax.experiments import probe_batch, rollout_batch, solve_batch, write_json
from rodflow_jax.experiments._evaluate import batch_of_one, grids
from rodflow_jax.problems import digits_data, init_mlp, mlp_apply, mse_loss
from rodflow_jax.problems._digits import cnn_apply, init_cnn
from rodflow_jax.problems._transformer import init_transformer, sort_data, transformer_apply

OUT = Path(__file__).parent / "results" / "scaling.json"
FLOWS = ("stable", "rod", "inertial")
MODELS = ("discrete", *FLOWS, "probe")
TSIT5_NEW_STAGES = 6  # Tsit5 is FSAL: 6 new vector-field evaluations per attempted step
NUM_PROBES = 8  # one probe_batch chunk
MOMENTUM = 0.9  # heavy ball, for the inertial rod flow
COMPARE_STEPS, COMPARE_BUDGET_S = 1000, 600.0
DEFAULT_SIZES = "2.4k,10k,50k,200k,1M"
TINY_SIZES = "0.6k"


# --- models -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Model:
    family: str
    label: str
    make: Callable  # () -> (loss_fn, params0), in the current default float dtype
    base_lr: float  # the built-in problem's GD rate, at the family's base size
    base: str  # the label of the family's base size (the built-in problem)


def mlp_model(width: int) -> Model:
    def make():
        x, y, _ = digits_data(500)
        params0 = init_mlp(jax.random.PRNGKey(0), sizes=(64, width, 10))
        return (lambda p: mse_loss(mlp_apply(p, x), y)), params0

    return Model("mlp", f"mlp 64-{width}-10", make, 0.2, "mlp 64-32-10")


def transformer_model(d_model: int) -> Model:
    def make():
        tokens, targets = sort_data(256, 6, 8)
        params0 = init_transformer(jax.random.PRNGKey(0), vocab=8, length=6, d_model=d_model, d_mlp=2 * d_model)

        def loss_fn(p):
            out = transformer_apply(p, tokens)
            return 0.5 * jnp.mean(jnp.sum((out - jax.nn.one_hot(targets, 8, dtype=out.dtype)) ** 2, axis=-1))

        return loss_fn, params0

    return Model("transformer", f"transformer d{d_model}", make, 0.4, "transformer d16")


def cnn_model(c1: int) -> Model:
    def make():
        x, y, _ = digits_data(500)
        images = x.reshape(-1, 8, 8, 1)
        params0 = init_cnn(jax.random.PRNGKey(0), channels=(1, c1, 2 * c1))
        return (lambda p: mse_loss(cnn_apply(p, images), y)), params0

    return Model("cnn", f"cnn {c1}/{2 * c1}", make, 0.2, "cnn 8/16")


BASES = {"mlp": mlp_model(32), "transformer": transformer_model(16), "cnn": cnn_model(8)}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmM]?)\s*", text)
    if not m:
        raise SystemExit(f"--sizes: cannot read {text!r} (e.g. 2.4k, 50000, 1M)")
    return int(round(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()]))


def mlp_width(num_params: int) -> int:
    """The width h of the 64-h-10 MLP closest to ``num_params`` (75 h + 10 parameters)."""
    return max(1, round((num_params - 10) / 75))


def num_params(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def models_for(families, sizes, max_params, transformer_dims=(16, 64), cnn_channels=(8, 12)) -> list[Model]:
    out = []
    if "mlp" in families:
        out += [mlp_model(w) for w in dict.fromkeys(mlp_width(s) for s in sizes)]
    if "transformer" in families:
        out += [transformer_model(d) for d in transformer_dims]
    if "cnn" in families:
        out += [cnn_model(c) for c in cnn_channels]
    kept = []
    for m in out:
        n = num_params(jax.eval_shape(lambda m=m: m.make()[1]))
        if max_params is None or n <= max_params:
            kept.append(m)
    return kept


# --- measuring ----------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def memory_method() -> str:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return "device memory_stats: peak_bytes_in_use after - bytes_in_use before"
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _proc_status()
        return "RSS high-water mark: VmHWM (reset via /proc/self/clear_refs) - VmRSS before"
    except OSError:
        return "ru_maxrss delta (process peak RSS growth; 0 when below an earlier peak)"


class Peak:
    """Peak memory of the enclosed block in MB, by :func:`memory_method`."""

    def __enter__(self):
        stats = jax.devices()[0].memory_stats()
        self.kind, self.exceeded = None, None
        if stats and "peak_bytes_in_use" in stats:
            self.kind, self.before, self.peak_before = "device", stats["bytes_in_use"], stats["peak_bytes_in_use"]
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.kind, self.before = "vmhwm", _proc_status()["VmRSS"]
        except OSError:
            self.kind, self.before = "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.kind == "device":
            stats = jax.devices()[0].memory_stats()
            self.mb = (stats["peak_bytes_in_use"] - self.before) / 2**20
            self.exceeded = stats["peak_bytes_in_use"] > self.peak_before  # False: an earlier call's peak
        elif self.kind == "vmhwm":
            self.mb = (_proc_status()["VmHWM"] - self.before) / 1024
        else:
            self.mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.before) / 1024
        return False


REPEAT_S = 10.0  # compiled calls are repeated (at most 3 in all) until they have taken this long


def twice(fn) -> dict:
    """``fn()`` compiled and run (the first call), then run again: once, or up to 3 times while the
    calls together take under ``REPEAT_S`` (the fastest is kept: the machine is shared, and a
    short call is easily hit by another job). Wall time and peak memory of each; the last
    call's result under ``out``."""
    rec, runs, peaks = {}, [], []
    with Peak() as pk:
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        rec["first_call_s"] = time.perf_counter() - t
    rec["peak_mb_first_call"] = round(pk.mb, 1)
    while not runs or (len(runs) < 3 and sum(runs) < REPEAT_S):
        with Peak() as pk:
            t = time.perf_counter()
            out = jax.block_until_ready(fn())
            runs.append(time.perf_counter() - t)
        peaks.append(pk)
    rec["run_s"] = min(runs)
    rec["run_calls_s"] = runs
    rec["peak_mb"] = round(max(p.mb for p in peaks), 1)
    if peaks[0].exceeded is not None:
        rec["peak_is_new_process_peak"] = bool(peaks[0].exceeded)
    rec["out"] = out
    return rec


def sharpness(loss_fn, params0) -> float:
    return float(rf.top_eigenvalues(loss_fn, params0, 1, method="lanczos", num_iter=30)[0])


def learning_rate(model: Model, loss_fn, params0, cache: dict) -> tuple[float, float]:
    """``(lr, lambda_0)``: the base problem's rate times ``lambda_0(base) / lambda_0(model)``."""
    lam = sharpness(loss_fn, params0)
    key = (model.family, str(jnp.result_type(float)))
    if key not in cache:
        cache[key] = lam if model.label == model.base else sharpness(*BASES[model.family].make())
    return model.base_lr * cache[key] / lam, lam


def _per_step(rec: dict, steps: int, extra: dict) -> dict:
    out = {k: v for k, v in rec.items() if k != "out"}
    out["time_per_step_s"] = rec["run_s"] / steps
    out.update(extra)
    return out


def gradient_time(loss_fn, params0) -> float:
    """The fastest of at least 5 compiled gradient calls (more while they take under a second)."""
    g = jax.jit(jax.grad(loss_fn))
    jax.block_until_ready(g(params0))
    best, spent, k = np.inf, 0.0, 0
    while k < 5 or (spent < 1.0 and k < 100):
        t = time.perf_counter()
        jax.block_until_ready(g(params0))
        dt = time.perf_counter() - t
        best, spent, k = min(best, dt), spent + dt, k + 1
    return best


def measure(loss_fn, params0, lr: float, steps: int, models=MODELS) -> dict:
    """Every model of ``models`` on one problem: see the module docstring."""
    n = num_params(params0)
    gd = rf.make_optimizer("gd", learning_rate=lr)
    hb = rf.make_optimizer("heavy_ball", learning_rate=lr, momentum=MOMENTUM)
    res = {}
    every, grid, _ = grids(n, steps, 1, None, 2e7)  # compare's saved-state grid for this run
    probe_at = np.unique(np.linspace(0, steps, NUM_PROBES).astype(int))
    probe_at = np.concatenate([probe_at, np.full(NUM_PROBES - len(probe_at), steps)])
    save = np.unique(np.concatenate([grid, grid + 1, probe_at]))
    opt_b, params_b = batch_of_one(gd.prepared(params0), params0)
    # one chunk of exactly steps + 1 (the default 64-step chunks would pad a short run)
    chunk = min(64, steps + 1)
    roll = twice(lambda: rollout_batch(opt_b, params_b, loss_fn, steps, save, chunk_size=chunk))
    computed = -(-(steps + 1) // chunk) * chunk
    if "discrete" in models:
        res["discrete"] = _per_step(roll, steps, {"gradients_per_step": computed / steps,
                                                  "diverged": bool(roll["out"].diverged_at[0] >= 0)})
    if "probe" in models:
        r = roll["out"]
        pos = [int(np.searchsorted(r.saved_steps, k)) for k in probe_at]
        p, s = jax.tree.map(lambda x: x[:, pos], r.saved)
        pr = twice(lambda: probe_batch(opt_b, loss_fn, p.params, s, k=1, method="lanczos"))
        hv = np.asarray(pr["out"].hvps[0])
        res["probe"] = {k: v for k, v in pr.items() if k != "out"}
        res["probe"].update(num_probes=NUM_PROBES, time_per_probe_s=pr["run_s"] / NUM_PROBES,
                            hvps_cold=int(hv[0]), hvps_per_warm_probe=float(hv[1:].mean()),
                            time_per_hvp_s=pr["run_s"] / float(hv.sum()),
                            sharpness_over_threshold=float(pr["out"].eigenvalues[0, 0, 0] / pr["out"].threshold[0, 0]))
    for kind in FLOWS:
        if kind not in models:
            continue
        opt = hb if kind == "inertial" else gd
        ob, pb = batch_of_one(opt.prepared(params0), params0)
        states = jax.jit(jax.vmap(lambda o, q: states_at(o, loss_fn, q, 0)))(ob, pb)
        ts = np.arange(0, steps + 1)
        sol = twice(lambda: solve_batch(kind, ob, loss_fn, states, ts, grid, np.array([np.inf])))
        fa = sol["out"]
        solver = int(fa.num_steps[0])
        g = GRADIENTS_PER_EVAL[kind]
        res[kind] = _per_step(sol, steps, {
            "solver_steps": solver, "rejected_steps": int(fa.num_rejected_steps[0]),
            "solver_steps_per_step": solver / steps,
            "gradients_per_step": g * (TSIT5_NEW_STAGES * solver + 1) / steps,
            "save_losses_per_step": SAVE_LOSSES[kind] * len(ts) / steps,
            "failed": bool(fa.result[0] != 0) or not bool(np.isfinite(fa.loss[0]).all()),
            "optimizer": "heavy_ball (momentum 0.9)" if kind == "inertial" else "gd"})
    return res


# gradients per vector-field evaluation and losses per save point, as counted by count_check
GRADIENTS_PER_EVAL = {"stable": 1, "rod": 2, "inertial": 2}
SAVE_LOSSES = {"stable": 1, "rod": 2, "inertial": 2}


def count_check(loss_fn, params0, lr: float, steps: int, flows=FLOWS) -> list[dict]:
    """Gradient and loss calls counted at run time (a host callback in the loss, counting each
    vmapped lane) against the formula ``g (6 n + 1) + l (steps + 1)`` for a batch-1 solve."""
    calls = [0]

    def bump(x):
        calls[0] += int(np.size(x))

    def counted(p):
        jax.debug.callback(bump, jax.tree.leaves(p)[0].reshape(-1)[0])
        return loss_fn(p)

    out = []
    for kind in flows:
        opt = rf.make_optimizer("heavy_ball", learning_rate=lr, momentum=MOMENTUM) if kind == "inertial" \
            else rf.make_optimizer("gd", learning_rate=lr)
        z0, s0, z1, s1 = jax.jit(lambda p: states_at(opt, loss_fn, p, 0))(params0)
        flow, y0 = rf.make_flow({"rod": "rod1"}.get(kind, kind), opt, counted, z0, s0, z1, s1)  # "rod": first order

        def count(fn, *a):
            jax.block_until_ready(fn(*a))  # compile (and a first run)
            jax.effects_barrier()
            calls[0] = 0
            jax.block_until_ready(fn(*a))
            jax.effects_barrier()
            return calls[0]

        g = count(jax.jit(lambda y: flow.vector_field(0.0, y, None)), y0)
        l_ = count(jax.jit(lambda y: flow.predicted_loss(y)), y0)
        calls[0] = 0
        run = rf.integrate(flow, y0, 0, steps)
        jax.effects_barrier()
        expected = g * (TSIT5_NEW_STAGES * run.solver_steps + 1) + l_ * (steps + 1)
        out.append({"flow": kind, "gradients_per_field_evaluation": g, "losses_per_save": l_,
                    "solver_steps": run.solver_steps, "counted_calls": calls[0], "formula_calls": expected,
                    "ok": calls[0] == expected and g == GRADIENTS_PER_EVAL[kind] and l_ == SAVE_LOSSES[kind]})
    return out


# --- fits ---------------------------------------------------------------------------------------
def slope(ns, ts) -> float | None:
    ns, ts = np.asarray(ns, float), np.asarray(ts, float)
    ok = np.isfinite(ts) & (ts > 0)
    if ok.sum() < 2 or len(np.unique(ns[ok])) < 2:
        return None
    return float(np.polyfit(np.log(ns[ok]), np.log(ts[ok]), 1)[0])


def _loglog(ns, ys, n):
    """Piecewise log-log interpolation of ``ys(ns)`` at ``n``; beyond the ends, the end segments' slopes."""
    ln, ly = np.log(ns), np.log(np.maximum(ys, 1e-12))
    if len(ns) == 1:
        return float(ys[0]) * n / ns[0]  # one point: assume linear growth
    i = int(np.clip(np.searchsorted(ln, math.log(n)) - 1, 0, len(ns) - 2))
    s = (ly[i + 1] - ly[i]) / (ln[i + 1] - ln[i])
    return float(np.exp(ly[i] + s * (math.log(n) - ln[i])))


def compare_seconds(rows, n: float, first_call: bool = False) -> float:
    """Predicted wall time of a default 1,000-step ``compare`` (discrete + stable + rod and their
    probes) at ``n`` parameters, from the measured MLP rows of one precision."""
    ns = np.array([r["num_params"] for r in rows], float)

    def at(model, key):
        return _loglog(ns, np.array([r["models"][model][key] for r in rows], float), n)

    _, _, probe_steps = grids(int(n), COMPARE_STEPS, 1, None, 2e7)
    t = COMPARE_STEPS * sum(at(m, "time_per_step_s") for m in ("discrete", "stable", "rod"))
    t += 3 * len(probe_steps) * at("probe", "time_per_probe_s")
    if first_call:  # compilation: the first call's excess over the compiled call, per kernel (interpolated in
        # log n, held constant beyond the measured sizes: it depends on the graph more than on the size)
        for m in ("discrete", "stable", "rod", "probe"):
            extra = [max(r["models"][m]["first_call_s"] - r["models"][m]["run_s"], 0.0) for r in rows]
            t += float(np.interp(math.log(n), np.log(ns), extra))
    return t


def largest_in_budget(rows, budget_s=COMPARE_BUDGET_S, first_call=False) -> dict:
    need = [r for r in rows if all(m in r["models"] for m in ("discrete", "stable", "rod", "probe"))]
    if not need:
        return {}
    need.sort(key=lambda r: r["num_params"])
    f = lambda n: compare_seconds(need, n, first_call)  # noqa: E731
    lo, hi = 10.0, 1e12
    if f(lo) > budget_s:
        n_star = None
    else:
        for _ in range(200):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if f(mid) <= budget_s else (lo, mid)
        n_star = int(lo)
    biggest = need[-1]["num_params"]
    return {"largest_params": n_star, "mlp_width": mlp_width(n_star) if n_star else None,
            "extrapolated_beyond_measured": bool(n_star and n_star > biggest),
            "predicted_s_at_measured": {str(r["num_params"]): round(f(r["num_params"]), 1) for r in need}}


# --- driver -------------------------------------------------------------------------------------
def set_precision(dtype: str) -> None:
    jax.config.update("jax_enable_x64", dtype == "float64")


def run_one(model: Model, dtype: str, steps: int, lr_cache: dict, models=MODELS) -> dict:
    set_precision(dtype)
    loss_fn, params0 = model.make()
    lr, lam = learning_rate(model, loss_fn, params0, lr_cache)
    t = time.perf_counter()
    res = measure(loss_fn, params0, lr, steps, models)
    t_grad = gradient_time(loss_fn, params0)
    for m, v in res.items():
        v["time_in_gradients"] = v["time_per_probe_s" if m == "probe" else "time_per_step_s"] / t_grad
    return {"family": model.family, "label": model.label, "num_params": num_params(params0), "dtype": dtype,
            "learning_rate": lr, "sharpness_0": lam, "steps": steps, "gradient_s": t_grad,
            "wall_s": time.perf_counter() - t,
            "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None, "models": res}


def fit_slopes(rows) -> dict:
    out = {}
    for (dtype, fam) in sorted({(r["dtype"], r["family"]) for r in rows}):
        rs = sorted((r for r in rows if r["dtype"] == dtype and r["family"] == fam), key=lambda r: r["num_params"])
        per = {}
        for m in MODELS:
            key = "time_per_probe_s" if m == "probe" else "time_per_step_s"
            pts = [(r["num_params"], r["models"][m][key]) for r in rs if m in r["models"]]
            per[m] = slope(*zip(*pts)) if len(pts) >= 2 else None
        out.setdefault(dtype, {})[fam] = per
    return out


def table(rows) -> str:
    head = ["model", "params", "dtype", "1 gradient ms", "discrete ms/step", "stable ms/step (grads)", "rod ms/step (grads)",
            "inertial ms/step (grads)", "probe ms (HVPs warm)", "rod peak MB", "first calls s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["models"]
        cell = lambda k: "-" if k not in m else f"{1e3 * m[k]['time_per_step_s']:.3g} ({m[k]['gradients_per_step']:.1f})"  # noqa: E731
        lines.append("| " + " | ".join([
            r["label"], f"{r['num_params']:,}", r["dtype"], f"{1e3 * r['gradient_s']:.3g}" if "gradient_s" in r else "-",
            f"{1e3 * m['discrete']['time_per_step_s']:.3g}" if "discrete" in m else "-",
            cell("stable"), cell("rod"), cell("inertial"),
            f"{1e3 * m['probe']['time_per_probe_s']:.3g} ({m['probe']['hvps_per_warm_probe']:.0f})" if "probe" in m else "-",
            f"{m['rod']['peak_mb']:.0f}" if "rod" in m else "-",
            f"{sum(v['first_call_s'] for v in m.values()):.1f}",
        ]) + " |")
    return "\n".join(lines)


def machine() -> dict:
    d = jax.devices()[0]
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(x) for x in jax.devices()], "device_kind": d.device_kind,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help=f"MLP parameter counts (default {DEFAULT_SIZES}; 2.4k is mlp-digits)")
    ap.add_argument("--max-params", type=lambda s: parse_size(s), default=None, help="skip every model above this")
    ap.add_argument("--families", default="mlp,transformer", help="any of mlp,transformer,cnn")
    ap.add_argument("--transformer-dims", default="16,64", help="d_model values (d_mlp = 2 d_model)")
    ap.add_argument("--cnn-channels", default="8,12", help="first-layer channels c (layers c, 2c)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--float64-max-params", type=lambda s: parse_size(s), default=parse_size("250k"),
                    help="skip float64 models above this (default 250k: on 2 CPU cores a float64 gradient of the "
                    "1M MLP takes 0.19 s, and its row about 7 minutes)")
    ap.add_argument("--float64-families", default="mlp", help="families also run in float64 (default mlp)")
    ap.add_argument("--steps", type=int, default=20, help="simulated steps per measurement, the same at every size (default 20)")
    ap.add_argument("--tiny", action="store_true", help=f"a dry run: MLP {TINY_SIZES}, 6 steps, float32, count check of the rod only")
    ap.add_argument("--time-limit-s", type=float, default=None,
                    help="start no row after this many seconds (rows run smallest first, the precisions "
                    "interleaved, so the largest are the ones left out; they are listed under skipped)")
    ap.add_argument("--no-count-check", action="store_true")
    ap.add_argument("--rows-from", nargs="+", default=None,
                    help="run nothing: join the rows of earlier runs' JSON files, refit, write --out")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    t_all = time.perf_counter()
    if a.rows_from:
        return join_runs(a.rows_from, a.out)
    if a.tiny:
        a.sizes = a.sizes or TINY_SIZES
        a.families = "mlp" if a.families == ap.get_default("families") else a.families
        a.dtypes = "float32" if a.dtypes == ap.get_default("dtypes") else a.dtypes
        a.steps = 6 if a.steps == ap.get_default("steps") else a.steps
    sizes = [parse_size(s) for s in (a.sizes or DEFAULT_SIZES).split(",")]
    families = a.families.split(",")
    dtypes = a.dtypes.split(",")
    todo = models_for(families, sizes, a.max_params, [int(x) for x in a.transformer_dims.split(",")],
                      [int(x) for x in a.cnn_channels.split(",")])
    info = machine()
    print(f"device: {info['devices']} ({info['device_kind']}), {info['cpu_count']} CPUs, {info['platform']}", flush=True)
    method = memory_method()
    print(f"peak memory: {method}", flush=True)
    out = {"description": __doc__.split("\n\n")[0], "machine": info, "memory_method": method,
           "settings": {"sizes": sizes, "families": families, "dtypes": dtypes, "max_params": a.max_params,
                        "steps": a.steps, "float64_max_params": a.float64_max_params,
                        "float64_families": a.float64_families.split(","), "time_limit_s": a.time_limit_s,
                        "tiny": a.tiny, "momentum_inertial": MOMENTUM, "num_probes": NUM_PROBES},
           "rows": [], "skipped": [], "count_checks": [], "slopes": {}, "ten_minute_compare": {}}
    rows, lr_cache = out["rows"], {}
    if not a.no_count_check:
        set_precision(dtypes[0])
        m = todo[0] if todo else mlp_model(32)
        loss_fn, params0 = m.make()
        lr, _ = learning_rate(m, loss_fn, params0, lr_cache)
        out["count_checks"] = count_check(loss_fn, params0, lr, a.steps, ("rod",) if a.tiny else FLOWS)
        for c in out["count_checks"]:
            print(f"count check {c['flow']}: {c['counted_calls']} calls counted, formula {c['formula_calls']}, "
                  f"{c['gradients_per_field_evaluation']} gradient(s) per evaluation: {'ok' if c['ok'] else 'MISMATCH'}",
                  flush=True)
    sized = [(num_params(jax.eval_shape(lambda m=m: m.make()[1])), m) for m in todo]
    order = sorted(((n, i, dtype, m) for i, (n, m) in enumerate(sized) for dtype in dtypes),
                   key=lambda x: (x[0], x[1], dtypes.index(x[2])))  # smallest first, precisions interleaved
    for n, _, dtype, m in order:
        why = None
        if dtype == "float64" and a.float64_max_params is not None and n > a.float64_max_params:
            why = f"above --float64-max-params {a.float64_max_params:,}"
        elif dtype == "float64" and m.family not in a.float64_families.split(","):
            why = "not in --float64-families"
        elif a.time_limit_s is not None and time.perf_counter() - t_all > a.time_limit_s:
            why = f"not started: --time-limit-s {a.time_limit_s:g} reached"
        if why:
            out["skipped"].append({"label": m.label, "num_params": n, "dtype": dtype, "why": why})
            print(f"skip {m.label} ({n:,}) in {dtype}: {why}", flush=True)
            continue
        row = run_one(m, dtype, a.steps, lr_cache)
        rows.append(row)
        print(table([row]).splitlines()[-1] + f"  [{row['wall_s']:.0f} s]", flush=True)
        out["total_wall_s"] = time.perf_counter() - t_all
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(a.out), out)  # after every row: a long run leaves its partial results
    fits(out)
    out["total_wall_s"] = time.perf_counter() - t_all
    report(out)
    print(f"total {out['total_wall_s']:.0f} s; wrote {a.out}")
    write_json(Path(a.out), out)
    return out


def fits(out: dict) -> None:
    """Sort the rows; fit the slopes and the 10-minute extrapolation into ``out``."""
    rows = out["rows"]
    dtypes = [d for d in ("float32", "float64") if any(r["dtype"] == d for r in rows)]
    rows.sort(key=lambda r: (dtypes.index(r["dtype"]), r["family"] != "mlp", r["family"], r["num_params"]))
    out["slopes"] = fit_slopes(rows)
    out["ten_minute_compare"] = {}
    for dtype in dtypes:
        mlp = [r for r in rows if r["dtype"] == dtype and r["family"] == "mlp"]
        out["ten_minute_compare"][dtype] = {"compiled": largest_in_budget(mlp),
                                           "first_call": largest_in_budget(mlp, first_call=True)}


def join_runs(files, out_path) -> dict:
    """One result from several runs' JSON (rows, skips and count checks joined; a row measured
    twice keeps the later file's)."""
    import json

    runs = [json.loads(Path(f).read_text()) for f in files]
    rows = {}
    for run in runs:
        for r in run["rows"]:
            rows[(r["label"], r["dtype"])] = r
    done = set(rows)
    out = {**{k: v for k, v in runs[0].items() if k not in ("rows", "skipped", "count_checks", "settings")},
           "joined_from": [{"file": str(f), "settings": r["settings"], "machine": r["machine"],
                            "total_wall_s": r.get("total_wall_s")} for f, r in zip(files, runs)],
           "rows": list(rows.values()),
           "skipped": [s for r in runs for s in r["skipped"] if (s["label"], s["dtype"]) not in done],
           "count_checks": [c for r in runs for c in r["count_checks"]]}
    out["skipped"] = list({(s["label"], s["dtype"]): s for s in out["skipped"]}.values())
    out["total_wall_s"] = sum(r.get("total_wall_s") or 0 for r in runs)
    fits(out)
    report(out)
    write_json(Path(out_path), out)
    print(f"joined {len(files)} runs; wrote {out_path}")
    return out


def report(out: dict) -> None:
    rows = out["rows"]
    print("\n" + table(rows))
    print("\nlog-log slope of time per step (per probe) against parameters:")
    for dtype, fams in out["slopes"].items():
        for fam, per in fams.items():
            print(f"  {dtype} {fam:11s} " + "  ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in per.items()))
    for dtype, d in out["ten_minute_compare"].items():
        c, f = d["compiled"], d["first_call"]
        if c and c["largest_params"]:
            print(f"  {dtype}: largest MLP for a 1,000-step default compare in 10 min: {c['largest_params']:,} params "
                  f"(width {c['mlp_width']}) compiled, "
                  + (f"{f['largest_params']:,}" if f.get("largest_params") else "none") + " with compilation"
                  + (" (extrapolated beyond the measured sizes)" if c["extrapolated_beyond_measured"] else ""))


if __name__ == "__main__":
    main()
