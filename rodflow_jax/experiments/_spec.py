"""The one place that resolves and validates a run, for every command and the Python API.

Problem defaults, the optimizer's hyperparameters, the step count, the start step, the models
and the parameters a loss differentiates are decided here and nowhere else; every check raises
:class:`~rodflow_jax.InputError` with one line.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InputError, leaf_kinds
from ..flows import FLOW_KINDS, flow_kind
from ..optimizers import AbstractOptimizer, hyperparameter_names, make_optimizer

MODELS = ("discrete", *FLOW_KINDS)
DEFAULT_MODELS = ("discrete", "stable", "rod")  # central costs Hessian eigenvectors: ask for it
USER_DEFAULT_STEPS = 500


@dataclasses.dataclass(frozen=True)
class ProblemSpec:
    """A problem resolved for one optimizer: ``make(seed) -> (loss_fn, params0)`` and its defaults."""

    label: str
    make: Callable
    hyperparameters: dict  # the problem's defaults for this optimizer (empty for a user problem)
    default_steps: int
    builtin: bool


def is_user_problem(spec: str) -> bool:
    return ".py" in spec or os.sep in spec


def resolve_problem(problem, optimizer_name: str) -> ProblemSpec:
    """A built-in name, ``path/file.py[:make]``, a :class:`~rodflow_jax.problems.Problem`, or a
    function ``make(seed) -> (loss_fn, params0)``."""
    from ..problems import Problem, get_problem, load_user_problem

    if isinstance(problem, str) and is_user_problem(problem):
        load_user_problem(problem, 0)  # a bad file is reported now, as one line
        return ProblemSpec(problem, lambda seed: load_user_problem(problem, seed), {}, USER_DEFAULT_STEPS, False)
    if isinstance(problem, str):
        problem = get_problem(problem)
    if isinstance(problem, Problem):
        hp = {"learning_rate": problem.learning_rates.get(optimizer_name),
              **problem.hyperparameters.get(optimizer_name, {})}
        return ProblemSpec(problem.name, problem.make, hp, problem.default_steps, True)
    if callable(problem):
        return ProblemSpec(getattr(problem, "__name__", "user"), problem, {}, USER_DEFAULT_STEPS, False)
    raise InputError("problem must be a problem name, a Problem or a function make(seed) -> (loss_fn, params0)")


def hyperparameters_for(optimizer_name: str, problem: ProblemSpec, given: dict) -> dict:
    """The problem's defaults for ``optimizer_name`` updated with ``given`` (unknown names are
    reported by :func:`make_optimizer`); a user problem needs a learning rate."""
    valid = set(hyperparameter_names(optimizer_name))
    hp = {k: v for k, v in problem.hyperparameters.items() if k in valid and v is not None}
    hp.update({k: v for k, v in given.items() if v is not None})
    if "learning_rate" not in hp:
        raise InputError("--learning-rate is required for a user problem")
    return hp


def optax_optimizer(name: str, opt_args: dict, given: dict) -> AbstractOptimizer:
    """``optax:NAME`` as :func:`~rodflow_jax.from_optax` of the factory ``optax.NAME`` with
    ``opt_args`` (and ``--learning-rate`` etc. if given): its float arguments, the constructor's
    float defaults included (so ``b1`` sets the default start step), are array leaves, so it can
    be swept and differentiated like a built-in."""
    from ..optimizers._optax import from_optax, optax_factory

    given = {k: v for k, v in given.items() if v is not None}
    twice = sorted(set(given) & set(opt_args))
    if twice:
        raise InputError(f"{', '.join(twice)} given twice: as --{twice[0].replace('_', '-')} and in --opt-args; give it once")
    kwargs = {**given, **opt_args}
    factory = optax_factory(name.split(":", 1)[1])
    if "learning_rate" not in kwargs and _requires(factory, "learning_rate"):
        raise InputError(f"optimizer '{name}' needs a learning rate (--learning-rate or --opt-args learning_rate=...)")
    return from_optax(factory, name=name, hyperparameters=kwargs)


def _requires(factory, argument: str) -> bool:
    """Whether ``factory``'s signature has ``argument`` without a default (or cannot be read)."""
    try:
        p = inspect.signature(factory).parameters.get(argument)
    except (TypeError, ValueError):
        return True
    return p is not None and p.default is inspect.Parameter.empty


def check_single_optimizer(optimizer, where: str) -> None:
    """:class:`InputError` unless ``optimizer`` is one optimizer: an :class:`AbstractOptimizer`
    (not a name or an optax transformation) whose hyperparameters are scalars (not a vmapped
    batch, which ``sweep`` makes from a grid)."""
    if not isinstance(optimizer, AbstractOptimizer):
        raise InputError(f"{where} takes an optimizer from rf.make_optimizer(...) or rf.from_optax(...), "
                         f"got {type(optimizer).__name__}")
    batched = {k: jnp.shape(v) for k, v in optimizer.hyperparameters().items()
               if not callable(v) and isinstance(v, (jax.Array, np.ndarray)) and jnp.ndim(v) > 0}
    if batched:
        raise InputError(f"{where} runs one optimizer; this one holds a batch of hyperparameters "
                         f"({', '.join(f'{k} {v}' for k, v in batched.items())}): give sweep a grid of values instead")


def resolve_optimizer(optimizer_name: str, problem: ProblemSpec, given: dict, opt_args: dict | None = None
                      ) -> AbstractOptimizer:
    if optimizer_name.startswith("optax:"):
        return optax_optimizer(optimizer_name, opt_args or {}, given)
    if opt_args:
        raise InputError("--opt-args goes with --optimizer optax:NAME")
    return make_optimizer(optimizer_name, **hyperparameters_for(optimizer_name, problem, given))


def grid_optimizers(optimizer_name, problem: ProblemSpec, configs: Sequence[dict], fixed: dict,
                    opt_args: dict | None = None) -> list[AbstractOptimizer]:
    """One optimizer per grid point ``configs[i]`` (hyperparameters by name): the base
    optimizer from the problem's defaults, ``fixed`` and ``opt_args``, with the swept values
    put in by :meth:`~rodflow_jax.AbstractOptimizer.with_hyperparameters` (validated, one line
    naming what can be swept)."""
    grid_names = list(dict.fromkeys(k for c in configs for k in c))
    first = configs[0] if configs else {}
    if isinstance(optimizer_name, AbstractOptimizer):
        if opt_args:
            raise InputError("opt_args go with an optimizer name optax:NAME, not an optimizer")
        base = optimizer_name.with_hyperparameters(**fixed) if fixed else optimizer_name
    else:
        base = resolve_optimizer(optimizer_name, problem, {**fixed, **first}, opt_args)
    sweepable = base.continuous_hyperparameters()
    unknown = [k for k in grid_names if k not in sweepable]
    if unknown:
        raise InputError(f"optimizer '{optimizer_name}' has no hyperparameter {', '.join(map(repr, unknown))} to sweep; "
                         f"it has: {', '.join(sweepable)}")
    return [base.with_hyperparameters(**c) for c in configs]


def default_start_step(optimizer: AbstractOptimizer) -> int:
    """``ceil(10 / (1 - beta))`` for momentum and Adam-type methods (their transient), else 0."""
    hp = optimizer.hyperparameters()
    beta = hp.get("momentum", hp.get("b1"))
    if beta is None:
        return 0
    return int(math.ceil(10.0 / (1.0 - float(beta)) - 1e-9))


def resolve_steps(num_steps, default: int) -> int:
    n = default if num_steps is None else num_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise InputError(f"steps must be an integer of at least 2, got {n!r}")
    return n


def resolve_start(start_step, optimizers: Sequence[AbstractOptimizer], num_steps: int) -> int:
    """``"auto"``: the largest :func:`default_start_step` over the optimizers; else an integer."""
    if start_step == "auto":
        K = max(default_start_step(o) for o in optimizers)
        if K > num_steps - 2:
            raise InputError(f"the automatic start step {K} needs at least {K + 2} steps, got {num_steps}")
        return K
    try:
        K = int(start_step)
    except (TypeError, ValueError):
        raise InputError(f"start step must be an integer or 'auto', got {start_step!r}") from None
    if not 0 <= K <= num_steps - 2:
        raise InputError(f"start step must lie in [0, steps - 2] = [0, {num_steps - 2}], got {K}")
    return K


def resolve_models(models, optimizer: AbstractOptimizer) -> list[str]:
    """Validated model names, discrete first, each flow checked against the optimizer's type."""
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    models = list(dict.fromkeys(models))
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise InputError(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODELS)}")
    for m in models:
        if m != "discrete":
            flow_kind(m).check(optimizer)
    return [m for m in MODELS if m in models]


def differentiable(loss_fn, params0):
    """``(loss over the inexact-array leaves, those leaves)``: an equinox module (or any pytree
    with non-array leaves, e.g. activation functions, or integer buffers) is accepted as it is,
    and only its floating-point arrays are trained and compared."""
    leaves = jax.tree.leaves(params0)
    if leaves and not any(eqx.is_inexact_array(x) for x in leaves):  # e.g. [1.0, 2.0]: Python floats are constants
        raise InputError(f"params0 has no floating-point array leaves (found {leaf_kinds(leaves)}): make the parameters arrays, "
                         "e.g. jnp.asarray([1.0, 2.0])")
    if all(eqx.is_inexact_array(x) for x in leaves):
        return loss_fn, params0
    arrays, static = eqx.partition(params0, eqx.is_inexact_array)

    def loss(p):
        return loss_fn(eqx.combine(p, static))

    return loss, arrays


def check_loss_shape(loss_fn, params0) -> None:
    """Raise :class:`InputError` unless ``params0`` has floating leaves and ``loss_fn`` maps it to
    a real scalar (traced, not computed: a loss that is not finite at ``params0`` is a result for
    the driver to record, not an input error). Half-precision parameters pass: a discrete run
    needs no probe or solver."""
    _check_params(params0, half_ok=True)
    try:
        out = jax.eval_shape(loss_fn, params0)
    except Exception as e:  # user code: report, do not crash
        raise InputError(f"loss_fn(params0) raised {type(e).__name__}: {e}") from None
    _check_scalar(getattr(out, "shape", None), out)


def _check_scalar(shape, value) -> None:
    if shape is None:
        raise InputError(f"loss_fn must return a scalar array, got {type(value).__name__}")
    if shape != ():
        raise InputError(f"loss_fn must return a scalar, got shape {shape}")


def check_problem(loss_fn, params0) -> None:
    """Raise :class:`InputError` unless ``params0`` has floating leaves and ``loss_fn(params0)``
    is a finite real scalar."""
    _check_params(params0)
    try:
        value = loss_fn(params0)
    except Exception as e:  # user code: report, do not crash
        raise InputError(f"loss_fn(params0) raised {type(e).__name__}: {e}") from None
    if not isinstance(value, (jax.Array, np.ndarray, np.generic)):  # a constant: 1.5 reached the solver as a float
        raise InputError(f"loss_fn must return a JAX scalar computed from the parameters, got {type(value).__name__} "
                         f"{value!r}")
    _check_scalar(jnp.shape(value), value)
    if not bool(jnp.isfinite(value)):
        raise InputError(f"loss is not finite at the initial parameters ({float(value)})")
    try:  # run eagerly it may work; every driver traces it (float(x), or `if` on a parameter, cannot be traced)
        jax.eval_shape(loss_fn, params0)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"loss_fn cannot be traced by JAX ({type(e).__name__}: {first}); write it with jax.numpy "
                         "operations only (jnp.where for branches, no float() or if on parameter values)") from None


def _check_params(params0, half_ok: bool = False) -> None:
    leaves = jax.tree.leaves(params0)
    if not leaves:
        raise InputError("params0 has no floating-point array leaves")
    for x in leaves:
        dtype = jnp.asarray(x).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise InputError(f"parameters must be floating-point arrays, got dtype {dtype}")
        if jnp.finfo(dtype).bits < 32 and not half_ok:
            raise InputError(f"parameters must be float32 or float64, got {dtype} (the sharpness probes and the "
                             "flows' solvers need at least float32; cast them in make(), or run with --float64)")


def default_out(command: str, problem: ProblemSpec, optimizer_name: str) -> Path:
    label = Path(problem.label.split(":")[0]).stem if not problem.builtin else problem.label
    prefix = "" if command == "compare" else f"{command}-"
    return Path("runs") / f"{prefix}{label}-{optimizer_name}"
