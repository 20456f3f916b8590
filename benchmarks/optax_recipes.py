"""Real optax recipes at the edge of stability: the discrete run, the stable flow and the rod.

For each recipe (an optax *factory* wrapped with ``rf.from_optax``, so its learning rate is an
array leaf) and problem: one vmapped sweep of the discrete run over a ladder of learning rates
(centre x 1/4 .. 4) picks the rate whose final edge ratio (the generic threshold, 1 at the edge;
for the warmup-cosine recipe, whose rate ends at a tenth of its peak, the largest over the run)
is closest to 1 without diverging; then one ``compare`` (discrete, stable, rod) at that rate.
Prints a table and writes ``benchmarks/results/optax_recipes.json``.

    python benchmarks/optax_recipes.py [--problems mlp-digits,transformer-sort] [--recipes adamw_wd1e-2,lion]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import optax  # noqa: E402

import rodflow_jax as rf  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402

OUT = Path(__file__).parent / "results" / "optax_recipes.json"


def clip_adamw_warmup_cosine(learning_rate, weight_decay=1e-2, max_norm=1.0, *, steps=1000):
    """``chain(clip_by_global_norm, adamw)`` with a warmup-cosine schedule peaking at ``learning_rate``
    (warmup over the first 10 %, decay to a tenth by the last step)."""
    # optax's schedule compares its peak with 0 in Python, so it cannot take a traced rate:
    # the same schedule as the rate times a unit-peak one
    unit = optax.warmup_cosine_decay_schedule(0.0, 1.0, steps // 10, steps, end_value=0.1)

    def schedule(count):
        return learning_rate * unit(count)

    return optax.chain(optax.clip_by_global_norm(max_norm), optax.adamw(schedule, weight_decay=weight_decay))


# name -> (factory, fixed arguments, ladder centre as a multiple of the problem's adam rate or nesterov rate)
RECIPES = {
    "adamw_wd1e-2": (optax.adamw, {"weight_decay": 1e-2}, ("adam", 1.0)),
    "adamw_wd1e-4": (optax.adamw, {"weight_decay": 1e-4}, ("adam", 1.0)),
    "clip_adamw_warmup_cosine": (clip_adamw_warmup_cosine, {"weight_decay": 1e-2}, ("adam", 1.0)),
    "sgd_nesterov_0.9": (optax.sgd, {"momentum": 0.9, "nesterov": True}, ("nesterov", 1.0)),
    "lion": (optax.lion, {}, ("adam", 0.3)),
    "adafactor": (optax.adafactor, {}, ("adam", 5.0)),
    "muon": (optax.contrib.muon, {}, ("adam", 10.0)),
}
LADDER = (0.25, 0.5, 1.0, 2.0, 4.0)


def _factory(recipe, steps):
    f, fixed, _ = RECIPES[recipe]
    if f is clip_adamw_warmup_cosine:
        def f(learning_rate, weight_decay=1e-2, max_norm=1.0, _steps=steps):
            return clip_adamw_warmup_cosine(learning_rate, weight_decay, max_norm, steps=_steps)
        f.__name__ = "clip_adamw_warmup_cosine"
    return f, fixed


def factory_uses_schedule(recipe):
    return RECIPES[recipe][0] is clip_adamw_warmup_cosine


def pick_rate(problem, recipe, steps):
    prob = rf.get_problem(problem)
    factory, fixed = _factory(recipe, steps)
    base_name, mult = RECIPES[recipe][2]
    centre = prob.learning_rates[base_name] * mult
    opt = rf.from_optax(factory, name=recipe, hyperparameters={"learning_rate": centre, **fixed})
    res = rf.sweep(prob, opt, {"learning_rate": [centre * m for m in LADDER]}, num_steps=steps,
                   models=("discrete",), probe_every=max(steps // 10, 1))
    # a schedule that decays to a tenth ends below the edge whatever its peak: judge it by its
    # largest edge ratio over the run instead of the final one
    ratio = res.arrays["discrete_sharpness"] / res.arrays["discrete_threshold"]
    peak = np.nanmax(np.where(np.isfinite(ratio), ratio, np.nan), axis=1)
    use_peak = factory_uses_schedule(recipe)
    ladder = [(r["hyperparameters"]["learning_rate"], float(peak[i]) if use_peak else r["discrete"]["sharpness_ratio_final"],
               r["discrete"]["diverged"]) for i, r in enumerate(res.records)]
    ok = [(lr, q) for lr, q, div in ladder if not div and q is not None and q > 0]
    lr = min(ok, key=lambda t: abs(math.log(t[1])))[0] if ok else centre
    return lr, ladder, opt


def run(problem, recipe, steps):
    t0 = time.perf_counter()
    lr, ladder, opt = pick_rate(problem, recipe, steps)
    t1 = time.perf_counter()
    loss_fn, p0 = rf.get_problem(problem).make(0)
    res = rf.compare(loss_fn, p0, opt.with_hyperparameters(learning_rate=lr), steps,
                     models=("discrete", "stable", "rod"))
    m = res.metrics
    d, st, rod = m["discrete"], m.get("stable", {}), m.get("rod", {})
    return {
        "problem": problem, "recipe": recipe, "steps": steps, "learning_rate": lr,
        "ladder": [{"learning_rate": a, "edge_ratio_final": b, "diverged": c} for a, b, c in ladder],
        "discrete_edge_ratio_final": d.get("sharpness_ratio_final"), "discrete_diverged_at": d.get("diverged_at"),
        "discrete_catapults": d.get("catapult_steps"), "start_step": m.get("start_step"),
        "stable_final": st.get("param_rel_error_final"), "stable_max": st.get("param_rel_error_max"),
        "rod_final": rod.get("param_rel_error_final"), "rod_max": rod.get("param_rel_error_max"),
        "ratio_final": m.get("error_ratio_final"), "ratio_max": m.get("error_ratio_max"),
        "rod_edge_ratio_final": rod.get("sharpness_ratio_final"), "stable_edge_ratio_final": st.get("sharpness_ratio_final"),
        "rod_catapults": rod.get("catapult_steps"), "rod_first_catapult_dt": rod.get("first_catapult_timing_error"),
        "stable_failed": st.get("failed"), "stable_message": st.get("message"), "rod_failed": rod.get("failed"),
        "stable_solver_steps": st.get("solver_steps"), "rod_solver_steps": rod.get("solver_steps"),
        "wall_pick_s": t1 - t0, "wall_compare_s": time.perf_counter() - t1,
    }


def _f(x, fmt="8.3g"):
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else f"{'-':>8s}"


def markdown(paths) -> str:
    """The README table from saved rows."""
    import json

    def f(x, fmt=".3g"):
        return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"

    out = ["| problem | recipe | lr | edge ratio d / rod (final) | stable / rod final error | stable / rod max error "
           "| catapults d / rod (first dt) | stable flow |", "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            st = "failed: " + (r["stable_message"] or "") if r["stable_failed"] else f"{r['stable_solver_steps']} steps"
            dt = r["rod_first_catapult_dt"]
            out.append(f"| {r['problem']} | {r['recipe']} | {f(r['learning_rate'])} | "
                       f"{f(r['discrete_edge_ratio_final'])} / {f(r['rod_edge_ratio_final'])} | "
                       f"{f(r['stable_final'])} / {f(r['rod_final'])} | {f(r['stable_max'])} / {f(r['rod_max'])} | "
                       f"{len(r['discrete_catapults'] or [])} / {len(r['rod_catapults'] or [])}"
                       f"{f' ({dt:+d})' if isinstance(dt, int) else ''} | {st} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--problems", default="mlp-digits,transformer-sort")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument("--steps", type=int, default=None, help="default: the problem's")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--table-from", nargs="+", default=None, help="print the README table from JSON files, run nothing")
    args = p.parse_args(argv)
    if args.table_from:
        print(markdown(args.table_from))
        return
    rows = []
    print(f"{'problem':17s} {'recipe':25s} {'lr':>8s} {'edge d':>8s} {'edge rod':>8s} {'stab fin':>8s} "
          f"{'rod fin':>8s} {'stab max':>8s} {'rod max':>8s} {'cats d':>6s} {'cats rod':>8s} {'dt1':>5s} {'wall':>6s}")
    for problem in args.problems.split(","):
        steps = args.steps or rf.get_problem(problem).default_steps
        for recipe in args.recipes.split(","):
            r = run(problem, recipe, steps)
            rows.append(r)
            print(f"{problem:17s} {recipe:25s} {_f(r['learning_rate'])} {_f(r['discrete_edge_ratio_final'])} "
                  f"{_f(r['rod_edge_ratio_final'])} {_f(r['stable_final'])} {_f(r['rod_final'])} {_f(r['stable_max'])} "
                  f"{_f(r['rod_max'])} {len(r['discrete_catapults'] or []):6d} {len(r['rod_catapults'] or []):8d} "
                  f"{_f(r['rod_first_catapult_dt'], '5')} {r['wall_pick_s'] + r['wall_compare_s']:5.0f}s", flush=True)
            write_json(Path(args.out), {"machine": platform.processor() or platform.machine(),
                                         "jax": jax.__version__, "optax": optax.__version__, "rows": rows})


if __name__ == "__main__":
    main()
