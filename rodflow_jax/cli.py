"""The ``rodflow`` command line: ``rodflow list``, ``compare``, ``sweep`` and ``hypergrad``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ._errors import InputError

HPARAM_FLAGS = ("learning_rate", "momentum", "b1", "b2", "eps", "decay")
DEFAULT_PROBLEM, DEFAULT_OPTIMIZER = "mlp-digits", "gd"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump
        raise InputError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rodflow", description="Rod flow, stable flow and the real optimizer at the edge of stability.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("list", help="list built-in problems and optimizers")
    c = sub.add_parser("compare", help="run discrete, stable and rod from one state and compare them")
    c.add_argument("--problem", default=DEFAULT_PROBLEM, help="built-in name, or path/to/file.py:make")
    c.add_argument("--optimizer", default=DEFAULT_OPTIMIZER)
    for name in HPARAM_FLAGS:
        c.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None)
    c.add_argument("--steps", type=int, default=None, help="discrete steps (default: the problem's)")
    c.add_argument("--start-step", default="auto", help="step K the flows start from, or 'auto'")
    c.add_argument("--models", default="discrete,stable,rod",
                   help="comma list of discrete, stable, rod, central (gd and the rmsprops), "
                   "inertial, inertial_stable (heavy_ball and nesterov)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--probe-every", type=int, default=None, help="sharpness probe interval (steps)")
    c.add_argument("--top-k", type=int, default=1, help="how many top eigenvalues each probe records")
    c.add_argument("--sharpness-method", default="auto", choices=("auto", "dense", "lanczos"),
                   help="dense Hessian (small models) or Lanczos on HVPs; auto picks by size")
    c.add_argument("--float64", action="store_true", help="run everything in double precision")
    c.add_argument("--out", default=None, help="output folder (default runs/PROBLEM-OPTIMIZER)")
    c.add_argument("--no-progress", action="store_true")
    _add_sweep_parsers(sub)
    return p


def _add_sweep_parsers(sub) -> None:
    """``rodflow sweep`` and ``rodflow hypergrad`` (see ``_sweep.py`` and ``_hypergrad.py``)."""
    s = sub.add_parser("sweep", help="every (hyperparameter, seed) configuration in one vmapped call per model")
    s.add_argument("--problem", default=DEFAULT_PROBLEM, help="built-in name, or path/to/file.py:make")
    s.add_argument("--optimizer", default=DEFAULT_OPTIMIZER)
    for name in HPARAM_FLAGS:
        s.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help="A:B:N[:log] or v1,v2,...")
    s.add_argument("--seeds", default="1", help="a count S (seeds 0..S-1) or a comma list of seeds")
    s.add_argument("--models", default="discrete,stable,rod")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--start-step", default="auto")
    s.add_argument("--probe-every", type=int, default=None)
    s.add_argument("--devices", default="none", choices=("none", "all"), help="all: shard configurations over local devices")
    s.add_argument("--float64", action="store_true")
    s.add_argument("--out", default=None, help="output folder (default runs/sweep-PROBLEM-OPTIMIZER)")
    s.add_argument("--no-progress", action="store_true")
    h = sub.add_parser("hypergrad", help="derivative of a run's objective with respect to hyperparameters")
    h.add_argument("--problem", default=DEFAULT_PROBLEM, help="built-in name, or path/to/file.py:make")
    h.add_argument("--optimizer", default=DEFAULT_OPTIMIZER)
    for name in HPARAM_FLAGS:
        h.add_argument("--" + name.replace("_", "-"), dest=name, type=float, default=None)
    h.add_argument("--steps", type=int, default=None)
    h.add_argument("--objective", default="final_loss", help="final_loss, mean_loss_last:K or final_sharpness")
    h.add_argument("--model", default="rod", choices=("discrete", "stable", "rod"))
    h.add_argument("--wrt", default="learning_rate", help="comma list of hyperparameters, and/or params0")
    h.add_argument("--start-step", default="auto")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--float64", action="store_true")
    h.add_argument("--out", default=None, help="JSON file (default: print only)")


def _cmd_list() -> int:
    from .optimizers import OPTIMIZERS, hyperparameter_names
    from .problems import list_problems

    print("problems:")
    for prob in list_problems():
        print(f"  {prob.name:18s} {prob.description}")
    print("optimizers:")
    for name in OPTIMIZERS:
        print(f"  {name:18s} {', '.join(hyperparameter_names(name))}")
    return 0


def _is_user_problem(spec: str) -> bool:
    return ".py" in spec or os.sep in spec


def _load(args):
    """(problem label, loss_fn, params0, default steps, problem hyperparameters for the optimizer)."""
    from .problems import get_problem, load_user_problem

    if _is_user_problem(args.problem):
        loss_fn, params0 = load_user_problem(args.problem, args.seed)
        if args.learning_rate is None:
            raise InputError("--learning-rate is required for a user problem")
        return Path(args.problem.split(":")[0]).stem, loss_fn, params0, 500, {}
    prob = get_problem(args.problem)
    loss_fn, params0 = prob.make(args.seed)
    hp = {"learning_rate": prob.learning_rates.get(args.optimizer), **prob.hyperparameters.get(args.optimizer, {})}
    return prob.name, loss_fn, params0, prob.default_steps, hp


def _table(metrics) -> str:
    from .flows import FLOW_KINDS

    rows = [f"{'model':15s} {'final loss':>11s} {'err final':>10s} {'err max':>10s} {'sharp/thr':>10s}  status"]
    d = metrics["discrete"]
    thr = metrics.get("threshold") or float("nan")
    fmt = lambda x: f"{x:10.3g}" if isinstance(x, (int, float)) else f"{'-':>10s}"  # noqa: E731
    status = f"diverged at step {d['diverged_at']}" if d["diverged"] else "ok"
    s = d.get("sharpness_final")
    rows.append(f"{'discrete':15s} {fmt(d['final_loss'])} {fmt(None)} {fmt(None)} {fmt(s / thr if s else None)}  {status}")
    for m in FLOW_KINDS:
        if m not in metrics:
            continue
        e = metrics[m]
        st = f"failed at step {e['failed_at']} ({e.get('message', '')})" if e.get("failed") else "ok"
        rows.append(
            f"{m:15s} {fmt(None)} {fmt(e.get('param_rel_error_final'))} {fmt(e.get('param_rel_error_max'))} "
            f"{fmt(e.get('sharpness_ratio_final'))}  {st}"
        )
    if metrics.get("error_ratio_final"):
        rows.append(f"stable/rod error ratio: final {metrics['error_ratio_final']:.3g}, max {metrics['error_ratio_max']:.3g}")
    rows.append(f"edge-of-stability onset (discrete sharpness >= 95% of threshold): step {metrics['eos_onset_step']}")
    return "\n".join(rows)


def _cmd_compare(args) -> int:
    if args.float64:
        import jax

        jax.config.update("jax_enable_x64", True)
    from ._compare import compare
    from .optimizers import hyperparameter_names, make_optimizer

    label, loss_fn, params0, default_steps, problem_hp = _load(args)
    user_hp = {k: getattr(args, k) for k in HPARAM_FLAGS if getattr(args, k) is not None}
    valid = set(hyperparameter_names(args.optimizer))
    hp = {k: v for k, v in problem_hp.items() if k in valid and v is not None}
    hp.update(user_hp)  # unknown flags for this optimizer are reported by make_optimizer
    optimizer = make_optimizer(args.optimizer, **hp)
    steps = args.steps if args.steps is not None else default_steps
    start = args.start_step if args.start_step == "auto" else _int(args.start_step, "--start-step")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    out = Path(args.out or f"runs/{label}-{args.optimizer}")
    result = compare(
        loss_fn, params0, optimizer, steps, start_step=start, models=models, probe_every=args.probe_every,
        top_k=args.top_k, sharpness_method=args.sharpness_method, progress=not args.no_progress,
    )
    result.metrics["problem"] = label
    result.metrics["seed"] = args.seed
    result.metrics["float64"] = bool(args.float64)
    result.save(out)
    print(_table(result.metrics))
    print(f"wrote {out}/metrics.json, trajectories.npz, loss.png, sharpness.png, param_error.png, summary.png")
    return 0


def _int(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{flag} must be an integer or 'auto', got {value!r}") from None


def _seeds(text: str) -> list[int]:
    try:
        if "," in text:
            return [int(v) for v in text.split(",") if v.strip()]
        n = int(text)
    except ValueError:
        raise InputError(f"--seeds must be a count or a comma list of integers, got {text!r}") from None
    if n < 1:
        raise InputError(f"--seeds must be at least 1, got {n}")
    return list(range(n))


def _make_for(spec: str):
    """``(problem, needs a learning rate)``: a built-in name, or ``make(seed)`` for a user file."""
    from .problems import get_problem, load_user_problem

    if _is_user_problem(spec):
        load_user_problem(spec, 0)  # report a bad file now, as one line
        return (lambda seed: load_user_problem(spec, seed)), True
    return get_problem(spec), False


def _cmd_sweep(args) -> int:
    if args.float64:
        import jax

        jax.config.update("jax_enable_x64", True)
    from ._sweep import sweep, values_from_range

    problem, needs_lr = _make_for(args.problem)
    grid = {k: values_from_range(getattr(args, k), "--" + k.replace("_", "-"))
            for k in HPARAM_FLAGS if getattr(args, k) is not None}
    if needs_lr and "learning_rate" not in grid:
        raise InputError("--learning-rate is required for a user problem")
    if "learning_rate" not in grid:
        raise InputError("--learning-rate A:B:N[:log] (or a comma list) is required for a sweep")
    start = args.start_step if args.start_step == "auto" else _int(args.start_step, "--start-step")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    label = Path(args.problem.split(":")[0]).stem if needs_lr else args.problem
    out = Path(args.out or f"runs/sweep-{label}-{args.optimizer}")
    result = sweep(problem, args.optimizer, grid, _seeds(args.seeds), args.steps, models=models, start_step=start,
                   probe_every=args.probe_every, devices=None if args.devices == "none" else "all",
                   progress=not args.no_progress)
    result.info["float64"] = bool(args.float64)
    result.save(out)
    n_div = sum(bool(r.get("discrete", {}).get("diverged")) for r in result.records)
    print(f"{len(result.records)} configurations, {n_div} diverged (discrete)")
    print(f"wrote {out}/sweep.json, sweep_info.json, sweep_arrays.npz, sweep_loss.png, sweep_sharpness.png")
    return 0


def _cmd_hypergrad(args) -> int:
    if args.float64:
        import jax

        jax.config.update("jax_enable_x64", True)
    import math

    from ._compare import default_start_step
    from ._hypergrad import hypergradient
    from ._io import write_json
    from ._tree import tree_norm
    from .optimizers import describe, hyperparameter_names, make_optimizer

    label, loss_fn, params0, default_steps, problem_hp = _load(args)
    valid = set(hyperparameter_names(args.optimizer))
    hp = {k: v for k, v in problem_hp.items() if k in valid and v is not None}
    hp.update({k: getattr(args, k) for k in HPARAM_FLAGS if getattr(args, k) is not None})
    optimizer = make_optimizer(args.optimizer, **hp)
    steps = args.steps if args.steps is not None else default_steps
    start = default_start_step(optimizer) if args.start_step == "auto" else _int(args.start_step, "--start-step")
    wrt = [w.strip() for w in args.wrt.split(",") if w.strip()]
    value, grad = hypergradient(loss_fn, params0, optimizer, steps, objective=args.objective, model=args.model,
                                wrt=wrt, start_step=start)
    out = {"objective_name": args.objective, "objective": value, "model": args.model, "problem": label,
           "optimizer": describe(optimizer), "steps": steps, "start_step": start, "seed": args.seed,
           "float64": bool(args.float64),
           "gradient": {k: v for k, v in grad.items() if k != "params0"}}
    if "params0" in grad:
        out["params0_gradient_norm"] = float(tree_norm(grad["params0"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out), out)
    shown = ", ".join(f"d/d{k} = {v:.6g}" for k, v in out["gradient"].items() if math.isfinite(v))
    print(f"{args.objective} ({args.model}) = {value:.6g}; {shown}")
    if "params0_gradient_norm" in out:
        print(f"|d/dparams0| = {out['params0_gradient_norm']:.6g}")
    return 0


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "list":
            return _cmd_list()
        if args.command == "compare":
            return _cmd_compare(args)
        if args.command == "sweep":
            return _cmd_sweep(args)
        if args.command == "hypergrad":
            return _cmd_hypergrad(args)
        _parser().print_help()
        return 2
    except InputError as e:
        print(f"rodflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rodflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
