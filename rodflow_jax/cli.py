"""The ``rodflow`` command line: ``list``, ``compare``, ``sweep``, ``merge`` and ``hypergrad``.

It only parses and prints: every run is resolved and validated by :mod:`rodflow_jax.experiments`
(the same code the Python API uses), and every output path is checked before any compute.
"""

from __future__ import annotations

import argparse
import math
import sys

from ._errors import InputError

HPARAM_FLAGS = ("learning_rate", "momentum", "b1", "b2", "eps", "decay")
DEFAULT_PROBLEM, DEFAULT_OPTIMIZER = "mlp-digits", "gd"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2, no usage dump
        raise InputError(message)


SEED_RANGE = (0, 2**32 - 1)  # what jax.random.PRNGKey takes on every platform


def _seed(text: str) -> int:
    """An argparse type: an integer seed in ``SEED_RANGE`` (larger ones overflow in the PRNG)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"a seed must lie in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {seed}")
    return seed


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    pass


def _common(numeric_hparams: bool) -> argparse.ArgumentParser:
    """The flags every run command shares."""
    c = _Parser(add_help=False)
    c.add_argument("--problem", default=DEFAULT_PROBLEM, help="built-in name (rodflow list), or path/to/file.py:make")
    c.add_argument("--optimizer", default=DEFAULT_OPTIMIZER,
                   help="one of the nine (rodflow list), or optax:NAME for any optax optimizer")
    c.add_argument("--opt-args", default="", help="with optax:NAME: its arguments, key=value,... "
                   "(e.g. learning_rate=0.01,weight_decay=1e-4); in sweep, key=A:B:N[:log] or "
                   "key='v1;v2;...' sweeps a float argument")
    for name in HPARAM_FLAGS:
        c.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                       type=_float(name) if numeric_hparams else str,
                       help="default: the problem's" if numeric_hparams else "A:B:N[:log|:lin] or v1,v2,... "
                       "(default: the problem's)")
    c.add_argument("--steps", type=int, default=None, help="discrete steps (default: the problem's)")
    c.add_argument("--start-step", default="auto", help="step K the flows start from, or 'auto': 0 for GD and "
                   "RMSProp, ceil(10/(1-beta)) with momentum or b1, or later for a run that starts above 1.5x its "
                   "threshold: where its initial transient ends (metrics.json's start_step and start_note say so; "
                   "in a sweep, per configuration; tune decides it once, at its first hyperparameters)")
    c.add_argument("--float64", action="store_true", help="run everything in double precision")
    c.add_argument("--no-progress", action="store_true", help="no progress bars or phase lines")
    c.add_argument("--progress", action="store_true", help="progress bars even when stderr is not a terminal")
    return c


def _run_flags(p) -> None:
    p.add_argument("--models", default="discrete,stable,rod",
                   help="comma list of discrete, stable, rod, central (gd and the rmsprops), "
                   "inertial, inertial_stable (heavy_ball, nesterov and the Adam family)")
    p.add_argument("--probe-every", type=int, default=None,
                   help="sharpness probe interval in steps, 1..N (default N/50)")
    p.add_argument("--top-k", type=int, default=1,
                   help="how many top eigenvalues each probe records, 1..number of parameters (default 1)")
    p.add_argument("--sharpness-method", default="auto", choices=("auto", "dense", "lanczos"),
                   help="auto: warm-started Lanczos (dense eigh only for tiny models)")
    p.add_argument("--central-k", type=int, default=2, help="central flow: number of critical directions")
    p.add_argument("--central-lanczos", type=int, default=24, help="central flow: Lanczos steps per evaluation")
    p.add_argument("--central-restoring", type=float, default=1.0, help="central flow: restoring rate kappa")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (after the new one is complete)")


def _float(name):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} must be a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} must be finite, got {text!r}")
        return v

    return parse


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="rodflow", description="Rod flow, stable flow and the real optimizer at the edge of stability.")
    p.add_argument("--version", action="version", version=f"rodflow {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sub.add_parser("list", help="built-in problems with their default rates, and the optimizers")
    c = sub.add_parser("compare", parents=[_common(True)], formatter_class=_Help,
                       help="run discrete and flows from one state and compare them")
    c.add_argument("--seed", type=_seed, default=0)
    c.add_argument("--out", default=None, help="output folder (default runs/PROBLEM-OPTIMIZER)")
    _run_flags(c)
    s = sub.add_parser("sweep", parents=[_common(False)], formatter_class=_Help,
                       help="every (hyperparameter, seed) configuration in one vmapped call per model")
    s.add_argument("--seeds", default="1", help="a count S (seeds 0..S-1) or a comma list of seeds")
    s.add_argument("--devices", default="none", choices=("none", "all"), help="all: shard configurations over devices")
    s.add_argument("--out", default=None, help="output folder (default runs/sweep-PROBLEM-OPTIMIZER)")
    s.add_argument("--batch-size", default="auto", metavar="B",
                   help="configurations per vmapped call on each device ('auto': 8 on a CPU, 128 on an accelerator); "
                   "each row at the same place of a call of this size in every layout, so the whole sweep and its "
                   "--shard slices agree bit for bit; lower it when a call does not fit in memory")
    s.add_argument("--shard", default=None, metavar="I/N",
                   help="run only slice I (0-based) of N of the configurations (a job array task; "
                   "join the N folders with rodflow merge)")
    s.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="with --devices all: join a jax.distributed run (one global mesh over every process) "
                   "whose process 0 listens at HOST:PORT")
    s.add_argument("--num-processes", type=int, default=None, help="with --coordinator: how many processes")
    s.add_argument("--process-id", type=int, default=None, help="with --coordinator: this process, 0..N-1")
    s.add_argument("--local-device-ids", default=None, metavar="I,J,...",
                   help="with --coordinator: this process's devices (default: jax's rule; under SLURM/Open MPI "
                   "on GPUs one device per task, its local rank)")
    _run_flags(s)
    m = sub.add_parser("merge", formatter_class=_Help, help="join the shard folders of one sweep (--shard I/N)")
    m.add_argument("dirs", nargs="+", metavar="DIR", help="the N shard folders, in any order")
    m.add_argument("--out", required=True, help="the merged sweep folder")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--no-progress", action="store_true",
                   help="accepted as by every other command (a merge shows no progress: it reads and writes files)")
    h = sub.add_parser("hypergrad", parents=[_common(True)], formatter_class=_Help,
                       help="derivative of a run's objective with respect to hyperparameters")
    h.add_argument("--objective", default="final_loss", help="final_loss, mean_loss_last:K or final_sharpness")
    h.add_argument("--model", default="rod", help="discrete or a flow (stable, rod, central, inertial, ...)")
    h.add_argument("--wrt", default="learning_rate", help="comma list of hyperparameters, and/or params0")
    h.add_argument("--estimator", default="auto", choices=("auto", "exact", "es", "smoothed"),
                   help="auto: es for mean_loss_last:K (the least-squares slope over the rate's +-width window, "
                   "from antithetic runs), exact otherwise (es for the central flow, which has no derivative); "
                   "exact: the derivative of the one trajectory; "
                   "smoothed: the same slope from exact derivatives")
    h.add_argument("--pairs", type=int, default=16, help="es/smoothed: antithetic sample pairs (2 x pairs runs)")
    h.add_argument("--width", type=float, default=0.1, help="es/smoothed: relative half-width of the window")
    h.add_argument("--estimator-seed", type=int, default=0, help="es/smoothed: seed of the stratified samples")
    h.add_argument("--seed", type=_seed, default=0)
    h.add_argument("--out", default=None, help="JSON file (default: print only)")
    h.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    t = sub.add_parser("tune", parents=[_common(True)], formatter_class=_Help,
                       help="hypergradient descent on an averaged objective (sign steps on the estimated trend)")
    t.add_argument("--objective", default="mean_loss_last:100", help="mean_loss_last:K, final_loss, ...")
    t.add_argument("--model", default="discrete", help="discrete or a flow whose objective is estimated")
    t.add_argument("--wrt", default="learning_rate", help="comma list of hyperparameters to move")
    t.add_argument("--iterations", type=int, default=8, help="hypergradient estimates, one sign step after each")
    t.add_argument("--step", type=float, default=0.2, help="first step in log(rate) (log(1 - decay) for decays)")
    t.add_argument("--estimator", default="es", choices=("es", "smoothed", "exact"),
                   help="how each iteration estimates the derivative (as in rodflow hypergrad)")
    t.add_argument("--pairs", type=int, default=4, help="es/smoothed: antithetic sample pairs per iteration")
    t.add_argument("--width", type=float, default=0.1, help="es/smoothed: relative half-width of the window")
    t.add_argument("--seed", type=_seed, default=0, help="the problem's seed (its make(seed))")
    t.add_argument("--out", default=None, help="JSON file (default: print only)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def _progress(args):
    return False if args.no_progress else (True if args.progress else "auto")


def _cmd_list() -> int:
    from .optimizers import OPTIMIZERS, hyperparameter_names
    from .problems import list_problems

    print("problems (default steps; default learning rate per optimizer; * = needs --float64 at that rate):")
    for prob in list_problems():
        print(f"  {prob.name:18s} {prob.description}")
        rates = []
        for name in OPTIMIZERS:
            lr = prob.learning_rates.get(name)
            mark = "*" if name in prob.float64_only else ""
            extra = "".join(f" {k}={v:g}" for k, v in prob.hyperparameters.get(name, {}).items())
            rates.append(f"{name}={lr:g}{extra}{mark}")
        print(f"  {'':18s} {prob.default_steps} steps; " + ", ".join(rates))
    print("optimizers (hyperparameters, optax's names):")
    for name in OPTIMIZERS:
        print(f"  {name:18s} {', '.join(hyperparameter_names(name))}")
    print("  optax:NAME         any optax optimizer, e.g. --optimizer optax:adamw --opt-args "
          "learning_rate=2e-3,weight_decay=1e-4; its threshold is measured: the edge ratio.\n"
          "                     compare, sweep (--opt-args weight_decay=1e-4:1e-2:3:log sweeps any float "
          "argument) and hypergrad (--wrt weight_decay) take it")
    from .flows import FLOWS
    from .flows._registry import default_construction
    from .optimizers import make_optimizer

    print("models (--models):")
    print(f"  {'discrete':18s} the optimizer itself")
    for name, kind in FLOWS.items():
        print(f"  {name:18s} {kind.description}")
    defaults = []
    for name in OPTIMIZERS:
        opt = make_optimizer(name, learning_rate=0.1)
        defaults.append(f"{name}={default_construction(opt)}")
    print(f"  {'':18s} rod runs, at each optimizer's default hyperparameters: " + ", ".join(defaults)
          + " (heavy ball and Nesterov by momentum: README, 'Which rod runs by default')")
    return 0


def _distributed(args) -> dict | None:
    """The ``jax.distributed.initialize`` arguments of ``sweep --coordinator ...``, checked, or None."""
    names = ("coordinator", "num_processes", "process_id", "local_device_ids")
    given = {n: getattr(args, n, None) for n in names}
    if all(v is None for v in given.values()):
        return None
    flag = lambda n: "--" + n.replace("_", "-")  # noqa: E731
    missing = [flag(n) for n in names[:3] if given[n] is None]
    if missing:
        raise InputError(f"a distributed run needs --coordinator, --num-processes and --process-id; "
                         f"missing {', '.join(missing)}")
    if args.devices != "all":
        raise InputError("--coordinator (a distributed run over one global mesh) needs --devices all")
    host, _, port = given["coordinator"].rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--coordinator must be HOST:PORT, got {given['coordinator']!r}")
    n, i = given["num_processes"], given["process_id"]
    if n < 1:
        raise InputError(f"--num-processes must be at least 1, got {n}")
    if not 0 <= i < n:
        raise InputError(f"--process-id must lie in 0..{n - 1}, got {i}")
    ids = given["local_device_ids"]
    if ids is not None:
        try:
            ids = [int(v) for v in ids.split(",") if v.strip()]
        except ValueError:
            ids = []
        if not ids or min(ids) < 0:
            raise InputError("--local-device-ids must be a comma list of device numbers, "
                             f"got {given['local_device_ids']!r}")
    return dict(coordinator_address=given["coordinator"], num_processes=n, process_id=i, local_device_ids=ids)


def _setup(args):
    dist = _distributed(args)
    if getattr(args, "float64", False):  # merge has no --float64
        import jax

        jax.config.update("jax_enable_x64", True)
    if dist is not None:  # before anything else touches a jax backend
        import jax

        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        try:
            jax.distributed.initialize(**dist)
        except (RuntimeError, ValueError) as e:
            raise InputError(f"cannot join the distributed run at {dist['coordinator_address']}: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    from .experiments import _signals

    _signals.install()


def _fmt(x) -> str:
    return f"{x:10.3g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else f"{'-':>10s}"


def _table(metrics) -> str:
    from .flows import FLOW_KINDS

    rows = [f"{'model':15s} {'final loss':>10s} {'err final':>10s} {'err max':>10s} {'sharp/thr':>10s} "
            f"{'catapults':>9s} {'first':>6s} {'dt':>5s}  status"]
    d = metrics["discrete"]
    status = f"diverged at step {d['diverged_at']}" if d.get("diverged") else "ok"

    def cat(e, dt=None):
        n = len(e.get("catapult_steps") or [])
        first = e.get("first_catapult_step")
        return f"{n:9d} {first if first is not None else '-':>6} {dt if dt is not None else '-':>5}"

    rows.append(f"{'discrete':15s} {_fmt(d.get('final_loss'))} {_fmt(None)} {_fmt(None)} "
                f"{_fmt(d.get('sharpness_ratio_final'))} {cat(d)}  {status}")
    for m in FLOW_KINDS:
        e = metrics.get(m)
        if e is None:
            continue
        st = f"failed at step {e.get('failed_at')} ({e.get('message') or 'non-finite'})" if e.get("failed") else (
            e.get("message") or "ok")
        label = f"{m} ({e['construction']})" if m == "rod" and e.get("construction") else m
        rows.append(f"{label:15s} {_fmt(e.get('final_loss'))} {_fmt(e.get('param_rel_error_final'))} "
                    f"{_fmt(e.get('param_rel_error_max'))} {_fmt(e.get('sharpness_ratio_final'))} "
                    f"{cat(e, e.get('first_catapult_timing_error'))}  {st}")
    if metrics.get("error_ratio_final") is not None:
        mx = metrics.get("error_ratio_max")
        rows.append(f"stable/rod error ratio: final {metrics['error_ratio_final']:.3g}"
                    + (f", max {mx:.3g}" if mx is not None else ""))

    def at(key):
        step = metrics.get(key)
        return "never" if step is None else f"step {step}"

    rows.append(f"edge of stability (discrete): sharpness >= 95% of threshold: {at('eos_onset_step')}; crosses it: "
                f"{at('eos_crossing_step')}; first catapult: {at('first_catapult_step')} (dt: a flow's first "
                "catapult minus the discrete one)")
    if metrics.get("start_note"):
        rows.append(metrics["start_note"])
    return "\n".join(rows)


def _given(args) -> dict:
    return {k: getattr(args, k) for k in HPARAM_FLAGS if getattr(args, k) is not None}


def _opt_args(args) -> dict:
    if not args.opt_args:
        return {}
    from .optimizers._optax import parse_opt_args

    return parse_opt_args(args.opt_args)


def _flow_options(args) -> dict:
    return {"central": {"k": args.central_k, "num_iter": args.central_lanczos, "restoring": args.central_restoring}}


def _cmd_compare(args) -> int:
    from .experiments import check_output, compare
    from .experiments._spec import default_out, resolve_optimizer, resolve_problem, resolve_steps

    spec = resolve_problem(args.problem, args.optimizer)
    optimizer = resolve_optimizer(args.optimizer, spec, _given(args), _opt_args(args))
    default = default_out("compare", spec, args.optimizer.replace(":", "-"))
    out = check_output(args.out if args.out is not None else default,
                       overwrite=args.overwrite)
    steps = resolve_steps(args.steps, spec.default_steps)
    loss_fn, params0 = spec.make(args.seed)
    result = compare(loss_fn, params0, optimizer, steps, start_step=args.start_step, models=args.models,
                     probe_every=args.probe_every, top_k=args.top_k, sharpness_method=args.sharpness_method,
                     flow_options=_flow_options(args), progress=_progress(args))
    result.metrics.update(problem=args.problem, seed=args.seed, float64=bool(args.float64))
    result.save(out, overwrite=args.overwrite)
    print(_table(result.metrics))
    print(f"wrote {args.out or out}/: metrics.json, timings.json, trajectories.npz, loss.png, sharpness.png, "
          "param_error.png, summary.png")
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()] if "," in text else None
        n = None if seeds is not None else int(text)
    except ValueError:
        raise InputError(f"--seeds must be a count or a comma list of integers, got {text!r}") from None
    if seeds is None and n < 1:
        raise InputError(f"--seeds must be at least 1, got {n}")
    out = [s for s in (seeds if seeds is not None else [n - 1])
           if not SEED_RANGE[0] <= s <= SEED_RANGE[1]]
    if out:
        raise InputError(f"--seeds: a seed must lie in {SEED_RANGE[0]}..{SEED_RANGE[1]}, got {out[0]}")
    if seeds is not None:
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            raise InputError(f"--seeds lists seed {', '.join(map(str, twice))} more than once (the rows would repeat)")
        return seeds
    return list(range(n))


_REFUSED = object()


def _on_primary(primary: bool, distributed: bool, check):
    """``check()`` (an output check) on process 0 only; under jax.distributed its refusal stops
    every process: process 0 raises it, the others print one line and get ``_REFUSED``."""
    from .experiments._sharding import all_agree

    result, refusal = None, None
    if primary:
        try:
            result = check()
        except InputError as e:
            refusal = e
    if distributed and not all_agree(refusal is None):
        if primary:
            raise refusal
        print("rodflow: error: process 0 cannot write the output folder (its log says why)", file=sys.stderr)
        return _REFUSED
    if refusal is not None:
        raise refusal
    return result


def _cmd_sweep(args) -> int:
    from .experiments import check_output, sweep, values_from_range
    from .experiments._merge import parse_shard
    from .experiments._sharding import is_primary
    from .experiments._spec import default_out, resolve_problem

    spec = resolve_problem(args.problem, args.optimizer)
    grid = {k: values_from_range(v, "--" + k.replace("_", "-")) for k, v in _given(args).items()}
    opt_args = _opt_args(args)
    for k, v in list(opt_args.items()):  # optax:NAME: key=A:B:N[:log] or key=v1;v2;... is swept
        if isinstance(v, str) and (":" in v or ";" in v):
            grid[k] = values_from_range(v.replace(";", ","), f"--opt-args {k}")
            del opt_args[k]
    if not spec.builtin and "learning_rate" not in grid and "learning_rate" not in opt_args:
        raise InputError("--learning-rate is required for a user problem")
    shard = parse_shard(args.shard) if args.shard is not None else None
    primary = args.coordinator is None or is_primary()  # under jax.distributed only process 0 writes
    out = _on_primary(primary, args.coordinator is not None,
                      lambda: check_output(args.out if args.out is not None else default_out("sweep", spec, args.optimizer),
                                           overwrite=args.overwrite))
    if out is _REFUSED:
        return 2
    result = sweep(args.problem, args.optimizer, grid, _seeds(args.seeds), args.steps, models=args.models,
                   opt_args=opt_args,
                   start_step=args.start_step, probe_every=args.probe_every, top_k=args.top_k,
                   sharpness_method=args.sharpness_method, flow_options=_flow_options(args),
                   devices=None if args.devices == "none" else "all", progress=_progress(args) if primary else False,
                   shard=shard, batch_size=args.batch_size)
    if not primary:
        return 0  # process 0 holds the same gathered results and writes them
    result.info["float64"] = bool(args.float64)
    result.info["problem"] = args.problem
    result.save(out, overwrite=args.overwrite)
    n_div = sum(bool(r["discrete"]["diverged"]) for r in result.records)
    print(f"{len(result.records)} configurations, {n_div} diverged (discrete)")
    print(f"wrote {args.out or out}/: sweep.json, sweep_info.json, timings.json, sweep_arrays.npz, sweep_loss.png, "
          "sweep_sharpness.png")
    return 0


def _cmd_merge(args) -> int:
    import json

    from .experiments._merge import merge_shards

    out = merge_shards(args.dirs, args.out, overwrite=args.overwrite)
    info = json.loads((out / "sweep_info.json").read_text())
    print(f"merged {info['merged_shards']} shards: {info['num_configurations']} configurations")
    print(f"wrote {args.out}/: sweep.json, sweep_info.json, timings.json, sweep_arrays.npz, sweep_loss.png, "
          "sweep_sharpness.png")
    return 0


def _one_run(args):
    """``(optimizer, output file or None, steps, loss_fn, params0, wrt)`` for hypergrad and tune,
    the output path checked before any compute."""
    from .experiments._output import check_output_file
    from .experiments._spec import resolve_optimizer, resolve_problem, resolve_steps

    spec = resolve_problem(args.problem, args.optimizer)
    optimizer = resolve_optimizer(args.optimizer, spec, _given(args), _opt_args(args))
    out = check_output_file(args.out, overwrite=args.overwrite) if args.out is not None else None
    steps = resolve_steps(args.steps, spec.default_steps)
    loss_fn, params0 = spec.make(args.seed)
    wrt = [w.strip() for w in args.wrt.split(",") if w.strip()]
    return optimizer, out, steps, loss_fn, params0, wrt


def _cmd_hypergrad(args) -> int:
    from .experiments._hypergrad import hypergradient_report
    from .experiments._output import write_json_atomic

    optimizer, out, steps, loss_fn, params0, wrt = _one_run(args)
    report = hypergradient_report(loss_fn, params0, optimizer, steps, objective=args.objective, model=args.model,
                                  wrt=wrt, start_step=args.start_step, estimator=args.estimator, pairs=args.pairs,
                                  width=args.width, seed=args.estimator_seed)
    report.update(problem=args.problem, seed=args.seed, float64=bool(args.float64))
    if out is not None:
        write_json_atomic(out, report, overwrite=args.overwrite)
    value = report["objective"]
    se = report.get("standard_error") or {}
    parts = [f"d/d{k} = {v + 0.0:.6g}" + (f" +- {se[k]:.2g}" if se.get(k) is not None else "")
             for k, v in report["gradient"].items() if v is not None]
    how = f"({report['estimator']}, {report['samples']} run{'s' if report['samples'] != 1 else ''})"
    shown = f"; {', '.join(parts)} {how}" if parts else f" {how}"
    print(f"{args.objective} ({args.model}) = {value:.6g}{shown}" if value is not None and math.isfinite(value)
          else f"{args.objective} ({args.model}) is not finite{shown}")
    if "params0_gradient_norm" in report:
        print(f"|d/dparams0| = {report['params0_gradient_norm']:.6g}")
    if report.get("message"):
        print(f"note: {report['message']}")
    return 0


def _cmd_tune(args) -> int:
    from .experiments import tune
    from .experiments._output import write_json_atomic
    from .optimizers import describe

    optimizer, out, steps, loss_fn, params0, wrt = _one_run(args)
    res = tune(loss_fn, params0, optimizer, steps, objective=args.objective, wrt=wrt, iterations=args.iterations,
               step=args.step, model=args.model, estimator=args.estimator, pairs=args.pairs, width=args.width,
               start_step=args.start_step, progress=_progress(args))
    report = {**res.to_json(), "problem": args.problem, "optimizer": describe(optimizer), "objective": args.objective,
              "model": args.model, "estimator": args.estimator, "pairs": args.pairs, "width": args.width,
              "steps": steps, "seed": args.seed, "float64": bool(args.float64)}
    if out is not None:
        write_json_atomic(out, report, overwrite=args.overwrite)
    for row in res.history:
        at = "  ".join(f"{k}={v:.6g}" for k, v in row["hyperparameters"].items())
        if row.get("diverged"):  # no estimate: say so rather than print nan
            print(f"{row['iteration']:3d}  {args.objective}: diverged (a run of the estimate diverged; stepping back)  {at}")
            continue
        print(f"{row['iteration']:3d}  {args.objective} = {row['objective']:.6g}  "
              + "  ".join(f"{k}={v:.6g} (d/d{k} {row['gradient'][k]:+.3g})" for k, v in row["hyperparameters"].items()))
    print("tuned: " + ", ".join(f"{k}={v:.6g}" for k, v in res.hyperparameters.items()) + f" ({res.runs} runs)")
    if all(row.get("diverged") for row in res.history):
        print("note: every iteration diverged, so no estimate was made; the tuned value is the start stepped back "
              "and was never run: start from a smaller rate")
    elif res.history[-1].get("diverged"):
        print("note: the last iteration diverged; the tuned value was stepped back from it and was not run")
    return 0


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "list":
            return _cmd_list()
        if args.command is None:
            _parser().print_help()
            return 2
        _setup(args)
        return {"compare": _cmd_compare, "sweep": _cmd_sweep, "merge": _cmd_merge,
                "hypergrad": _cmd_hypergrad, "tune": _cmd_tune}[args.command](args)
    except InputError as e:
        print(f"rodflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rodflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rodflow list | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
