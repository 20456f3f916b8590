r"""Hypergradients: derivatives of a scalar objective of a run with respect to hyperparameters.

Three models, one objective:

* ``"discrete"``: the unrolled optimizer, ``jax.grad`` through ``lax.scan`` (exact derivative
  of the discrete run; at the edge of stability it is erratic, since the discrete dynamics are
  chaotic there and the derivative of a long run grows like the product of step Jacobians);
* ``"stable"`` and ``"rod"``: the flows, started from the discrete states at ``start_step``
  (themselves differentiated through the first ``start_step + 1`` steps), integrated by diffrax
  with ``RecursiveCheckpointAdjoint`` -- discretise-then-optimise: reverse-mode through the
  solver's own steps with binomial checkpointing, so the gradient is the exact derivative of the
  computed solution (no second ODE solve whose error could differ from the forward one).
  ``BacksolveAdjoint`` (optimise-then-discretise) integrates the adjoint ODE backwards in time
  and re-solves the state backwards too, which is unstable for the rod flow: the rod's
  half-vector dynamics are expanding in directions that the backward solve must contract, and
  its gradients would not match finite differences.

Objectives: ``"final_loss"`` (``L(z_N)``, or the flow's predicted loss at ``t = N``),
``"mean_loss_last:K"`` (mean over the last K integer steps ``N-K+1 .. N``, saved by
``SaveAt(ts=...)`` for the flows), and ``"final_sharpness"`` (the top eigenvalue of the
(preconditioned) Hessian at the final state: a dense ``eigh`` for up to
``DENSE_MAX_PARAMS`` parameters, else a fixed number of Lanczos iterations -- both
differentiable, the first exactly, the second to the accuracy of its convergence).

Hyperparameters are the optimizer's array leaves; the optimizer is rebuilt from a dict of traced
scalars with its ``with_hyperparameters`` (for the built-ins, :func:`make_optimizer`, whose range
checks skip tracers; for ``from_optax`` of a factory, the factory's float arguments).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from .._discrete import init_carry, rollout_chunk, states_at, window_at
from .._errors import InputError
from .._integrate import SolverConfig, default_solver, solve
from .._resources import relieve_map_pressure
from .._sharpness import optimizer_sharpness
from ..flows import FLOW_KINDS, flow_kind
from ..flows._registry import resolve
from ..flows._rod import period_two_endpoints, period_two_order, period_two_trusted
from ..optimizers import AbstractOptimizer
from ._evaluate import auto_start
from ._estimators import DEFAULT_ESTIMATOR, DEFAULT_PAIRS, Estimate, EstimatorSettings, smoothed_estimate
from ._spec import check_problem, differentiable, resolve_start

HG_MODELS = ("discrete", *FLOW_KINDS)


def parse_objective(objective: str, num_steps: int) -> tuple[str, int]:
    """``"final_loss"`` -> ("final_loss", 1), ``"mean_loss_last:K"`` -> ("mean_loss", K), ..."""
    if objective in ("final_loss", "final_sharpness"):
        return objective, 1
    head, _, k = objective.partition(":")
    if head == "mean_loss_last":
        # digits only, no sign, space or leading zero: the objective's name is recorded as written
        K = int(k) if k.isascii() and k.isdigit() and not k.startswith("0") else 0
        if not 1 <= K <= num_steps:
            raise InputError(f"objective mean_loss_last:K needs 1 <= K <= steps ({num_steps}), got {objective!r}")
        return "mean_loss", K
    raise InputError(f"unknown objective {objective!r}; choose final_loss, mean_loss_last:K or final_sharpness")


def _discrete_losses(optimizer, loss_fn, params0, num_steps):
    """``L(z_0 .. z_N)`` and the final ``(z_N, s_N)``: the rollout kernel, unrolled and differentiated."""
    carry, out = rollout_chunk(optimizer, loss_fn, init_carry(optimizer, loss_fn, params0),
                               jnp.arange(num_steps + 1), num_steps)
    return out.loss, carry.phase, carry.slow


def _flow_losses(kind, optimizer, loss_fn, params0, num_steps, start_step, config, options):
    """Predicted losses at ``t = start_step .. N`` and the final centre and slow state (the solve kernel)."""
    kind_ = flow_kind(resolve(kind, optimizer))  # "rod": the construction _default_rod_start would run
    if kind_.period_two_start:  # the rod's half-vector from the iterates' period-2 part (flows/_rod.py)
        window, sK, s1 = window_at(optimizer, loss_fn, params0, start_step, period_two_order(num_steps - start_step))
        z0, z1 = period_two_endpoints(window)
        trusted = period_two_trusted(window)  # else a transient: the two iterates, as _evaluate does
        z0, z1 = (jax.tree.map(lambda a, b: jnp.where(trusted, a, b), p, z) for p, z in ((z0, window[0]), (z1, window[1])))
        states = (z0, sK, z1, s1)
    else:
        states = states_at(optimizer, loss_fn, params0, start_step)
    flow, y0 = kind_.start(optimizer, loss_fn, *states, **dict(options))
    dtype = jax.tree.leaves(y0)[0].dtype
    config = config or default_solver(flow, dtype, differentiable=True)  # explicit: see default_solver
    ts = jnp.arange(start_step, num_steps + 1).astype(dtype)
    sol = solve(flow, y0, ts, ts[-1:], config)
    return sol.loss, jax.tree.map(lambda x: x[-1], sol.centre), jax.tree.map(lambda x: x[-1], sol.slow)


@functools.lru_cache(maxsize=32)
def objective_fn(
    loss_fn, num_steps: int, *, objective: str = "final_loss", model: str = "discrete", start_step: int = 0,
    config: SolverConfig | None = None, sharpness_method: str = "auto", options: tuple = (),
):
    """``(optimizer, params0) -> objective value``: a pure, differentiable function.

    Cached on its (hashable) arguments, so repeated hypergradients of one problem compile once.
    """
    kind, K = parse_objective(objective, num_steps)
    if model not in HG_MODELS:
        raise InputError(f"unknown model {model!r}; choose from {', '.join(HG_MODELS)}")
    if model != "discrete" and not 0 <= start_step <= num_steps - 2:
        raise InputError(f"start step must lie in [0, steps - 2] = [0, {num_steps - 2}], got {start_step}")

    def f(optimizer, params0):
        if model == "discrete":
            losses, phase, slow = _discrete_losses(optimizer, loss_fn, params0, num_steps)
            params = phase.params
        else:
            losses, params, slow = _flow_losses(model, optimizer, loss_fn, params0, num_steps, start_step, config,
                                                options)
        if kind == "final_loss":
            return losses[-1]
        if kind == "mean_loss":
            return jnp.mean(losses[-K:])
        return optimizer_sharpness(optimizer, loss_fn, params, slow, 1, sharpness_method, num_iter=60).eigenvalues[0]

    return f


@eqx.filter_jit
def _value_and_grad(f, optimizer, x, params0, with_params: bool):
    def g(x, p):
        return f(_with_hyperparameters(optimizer, x), p)

    return jax.value_and_grad(g, argnums=(0, 1) if with_params else 0)(x, params0)


@functools.lru_cache(maxsize=32)
def _sample_value_and_grad(f):
    """``(optimizer, {name: value}, params0) -> (value, {name: derivative})`` for ``f`` (cached, so
    the vmapped samples of repeated estimates share one compilation)."""
    def value_and_grad(o, xs, p):
        return jax.value_and_grad(lambda xs: f(_with_hyperparameters(o, xs), p))(xs)

    return value_and_grad


def _with_hyperparameters(optimizer: AbstractOptimizer, values: dict[str, Any]) -> AbstractOptimizer:
    return optimizer.with_hyperparameters(**values)


def _resolve_estimator(estimator, objective: str, wrt: Sequence[str], pairs: int, width: float, seed: int
                       ) -> EstimatorSettings:
    """``"auto"``: the measured default (:data:`DEFAULT_ESTIMATOR`) for an averaged objective
    (``mean_loss_last:K``) of hyperparameters only; ``"exact"`` otherwise."""
    if isinstance(estimator, EstimatorSettings):
        return estimator
    if estimator == "auto":
        averaged = objective.startswith("mean_loss_last")
        estimator = DEFAULT_ESTIMATOR if averaged and "params0" not in wrt else "exact"
    if estimator != "exact" and "params0" in wrt:
        raise InputError("params0 is differentiated only by the exact estimator (--estimator exact)")
    return EstimatorSettings(estimator, pairs, width, seed)


def estimate_hypergradient(
    loss_fn,
    params0,
    optimizer: AbstractOptimizer,
    num_steps: int,
    *,
    objective: str = "final_loss",
    model: str = "discrete",
    wrt: Sequence[str] = ("learning_rate",),
    start_step: int | str = "auto",
    config: SolverConfig | None = None,
    sharpness_method: str = "auto",
    flow_options: dict | None = None,
    estimator="auto",
    pairs: int = DEFAULT_PAIRS,
    width: float = 0.1,
    seed: int = 0,
) -> Estimate:
    """The objective's derivatives ``{name: d objective / d name}`` by an estimator
    (:mod:`._estimators`): ``"exact"`` (one trajectory), ``"es"`` / ``"smoothed"`` (the
    least-squares slope over ``theta (1 +- width)``, from ``pairs`` antithetic pairs in one
    vmapped call), or ``"auto"``. Returns an :class:`~._estimators.Estimate` with standard errors
    and the number of runs it cost.

    ``wrt`` names hyperparameters of ``optimizer`` (optax's names) and/or ``"params0"`` (the
    derivative is then a pytree like ``params0``; exact only). ``start_step="auto"`` is
    ``compare``'s (:func:`flow_start`). See the module docstring for the models, objectives and
    the adjoint.
    """
    if model not in HG_MODELS:
        raise InputError(f"unknown model {model!r}; choose from {', '.join(HG_MODELS)}")
    if model != "discrete":
        flow_kind(model).check(optimizer)
        model = resolve(model, optimizer)  # "rod": its construction, decided before anything is traced
    wrt = [wrt] if isinstance(wrt, str) else list(wrt)  # one name, not its letters
    relieve_map_pressure()
    reason = flow_kind(model).not_differentiable if model != "discrete" else None
    if reason is not None and estimator == "auto" and "params0" not in wrt:
        estimator = "es"  # values only: the one estimator such a flow allows
    settings = _resolve_estimator(estimator, objective, wrt, pairs, width, seed)
    if reason is not None and settings.name != "es":
        raise InputError(f"the {model} flow cannot be differentiated: {reason}; use the estimator es "
                         "(--estimator es), which needs only its values")
    loss_fn, params0 = differentiable(loss_fn, params0)
    check_problem(loss_fn, params0)
    optimizer = optimizer.prepared(params0)
    start_step = flow_start(loss_fn, params0, optimizer, num_steps, model, start_step)
    hp_all = optimizer.hyperparameters()
    if any(callable(hp_all.get(w)) for w in wrt if w != "params0"):
        raise InputError("cannot differentiate with respect to a learning-rate schedule")
    can = optimizer.continuous_hyperparameters()
    unknown = [w for w in wrt if w != "params0" and w not in can]
    if unknown or not wrt:
        raise InputError(
            f"cannot differentiate with respect to {', '.join(map(repr, unknown)) or 'nothing'}; "
            f"optimizer '{optimizer.name}' has: {', '.join(can) or 'no continuous hyperparameters'}, and params0"
        )
    f = objective_fn(loss_fn, num_steps, objective=objective, model=model, start_step=start_step,
                     config=config, sharpness_method=sharpness_method,
                     options=tuple(sorted((flow_options or {}).items())))
    dtype = jnp.result_type(*jax.tree.leaves(params0))
    x = {w: jnp.asarray(hp_all[w], dtype) for w in wrt if w != "params0"}
    if settings.name != "exact":
        return smoothed_estimate(f, _sample_value_and_grad(f), optimizer, params0,
                                 {k: float(v) for k, v in x.items()}, settings)
    value, grads = _value_and_grad(f, optimizer, x, params0, "params0" in wrt)
    if not bool(jnp.isfinite(value)):  # a diverged run's derivative is 0 or NaN, never a slope: NaN
        grads = jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads)
    if "params0" in wrt:
        gx, gp = grads
        out = {**{k: float(v) for k, v in gx.items()}, "params0": gp}
    else:
        out = {k: float(v) for k, v in grads.items()}
    return Estimate(float(value), {w: out[w] for w in wrt}, {w: None for w in wrt if w != "params0"}, settings, 1, 1)


def flow_start(loss_fn, params0, optimizer: AbstractOptimizer, num_steps: int, model: str, start_step) -> int:
    """The step a ``model`` flow's hypergradient starts from: 0 for ``"discrete"`` (no flow), an
    integer as given, and ``"auto"`` as ``compare`` resolves it: the optimizer's default, or
    later where a run that starts past its edge ends its initial transient
    (:func:`~._evaluate.transient_starts`). That costs a probe at step 0, and an undifferentiated
    discrete run with its probes where that probe finds the run above 1.5x its threshold;
    ``tune`` resolves it once, at its first hyperparameters."""
    if model == "discrete":  # no flow to start; a start step given is still checked, not ignored
        if start_step != "auto":
            resolve_start(start_step, [optimizer], num_steps)
        return 0
    K = resolve_start(start_step, [optimizer], num_steps)
    if start_step != "auto":
        return K
    loss_fn, params0 = differentiable(loss_fn, params0)
    return auto_start(loss_fn, optimizer.prepared(params0), params0, num_steps, K)


def hypergradient(loss_fn, params0, optimizer: AbstractOptimizer, num_steps: int, *, estimator="exact",
                  **kw) -> tuple[float, dict[str, Any]]:
    """``(value, {name: derivative})``: :func:`estimate_hypergradient` without the bookkeeping.

    Its default is the ``"exact"`` derivative of the one trajectory (what its name says); pass
    ``estimator="es"`` (or ``"auto"``, the command line's default) for the trend's slope at the
    edge of stability, or use :func:`estimate_hypergradient` for standard errors and costs."""
    est = estimate_hypergradient(loss_fn, params0, optimizer, num_steps, estimator=estimator, **kw)
    return est.value, est.gradient


def objective_value(loss_fn, params0, optimizer, num_steps, **kw) -> float:
    """The objective alone (for finite differences), jitted."""
    if kw.get("model", "discrete") != "discrete":
        kw["model"] = resolve(kw["model"], optimizer)  # as estimate_hypergradient: "rod" is a construction
    f = objective_fn(loss_fn, num_steps, **kw)
    return float(eqx.filter_jit(f)(optimizer, params0))


def _no_gradient_past_divergence(out: dict, loss_fn, params0, optimizer, num_steps: int, model: str) -> None:
    """``out`` for an objective that is not finite: no gradient (a derivative of a diverged run
    is 0 or NaN, not a slope: a QA pass read ``d/dlearning_rate = 0`` off a run that diverged
    at step 17), the discrete run's divergence step, and why."""
    from .._discrete import run_discrete

    run = run_discrete(optimizer, loss_fn, params0, num_steps, save_steps=[0])
    out["gradient"] = {k: None for k in out["gradient"]}
    out.pop("params0_gradient_norm", None)
    out["diverged_at"] = run.diverged_at
    out["message"] = (f"the discrete run diverged at step {run.diverged_at}: no gradient" if run.diverged_at is not None
                      else f"the {model} model's objective is not finite (the discrete run did not diverge): no gradient")


def hypergradient_report(loss_fn, params0, optimizer: AbstractOptimizer, num_steps: int, *,
                         objective: str = "final_loss", model: str = "rod", wrt: Sequence[str] = ("learning_rate",),
                         start_step: int | str = "auto", **kw) -> dict[str, Any]:
    """:func:`hypergradient` as the JSON record ``rodflow hypergrad`` writes."""
    from .._tree import tree_norm
    from ..optimizers import describe

    K = flow_start(loss_fn, params0, optimizer, num_steps, model, start_step)
    est = estimate_hypergradient(loss_fn, params0, optimizer, num_steps, objective=objective, model=model, wrt=wrt,
                                 start_step=K, **kw)
    value, grad = est.value, est.gradient
    out = {"objective_name": objective, "objective": value, "model": model, "estimator": est.settings.name,
           "estimator_settings": est.settings.to_json(), "samples": est.runs,
           "objective_is": "the objective at the given hyperparameters" if est.settings.name == "exact"
           else "the mean over the samples (the smoothed objective)",
           "optimizer": describe(optimizer), "steps": num_steps, "start_step": K,
           "gradient": {k: v for k, v in grad.items() if k != "params0"},
           "standard_error": est.stderr, "cost": {"runs": est.runs, "derivatives": est.derivatives}}
    if "params0" in grad:
        out["params0_gradient_norm"] = float(tree_norm(grad["params0"]))
    bad = [k for k, v in out["gradient"].items() if not math.isfinite(v)]
    if est.settings.name == "exact" and (value is None or not math.isfinite(value)):
        _no_gradient_past_divergence(out, loss_fn, params0, optimizer, num_steps, model)
    elif est.nonfinite:
        out["message"] = (f"{est.nonfinite} of {est.runs} samples are not finite (diverged runs): the window "
                          f"theta (1 +- {est.settings.width:g}) reaches past stability; use a smaller --width or rate")
    elif bad and value is not None and math.isfinite(value):
        out["message"] = (f"the derivative with respect to {', '.join(bad)} is not finite"
                          + ("; an optax optimizer dividing by sqrt(nu) has an infinite derivative where nu = 0 "
                             "(a parameter whose gradient is always 0): pass eps_root=1e-30, optax's option for "
                             "differentiating through the optimizer" if not optimizer.analytic_threshold else ""))
    return out
