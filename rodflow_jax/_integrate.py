"""Integrating a flow with diffrax, saving only what the comparison needs."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import lineax as lx
import numpy as np
import optimistix as optx

from ._errors import InputError
from ._tree import tree_all_finite, tree_norm
from .flows import AbstractFlow, SecondOrderFlow, StableFlow
from .optimizers import AbstractAdaptiveOptimizer


class SolverConfig(eqx.Module):
    """How a flow is integrated: solver, tolerances and step budget.

    Measured defaults (see README, "Choosing the solver"): the rod flow needs Tsit5 with tight
    tolerances (looser ones leave |r| far above rounding before the edge and seed a fake early
    oscillation); the stable flow of the adaptive optimizers is stiff and gets an implicit solver.
    """

    solver: Any = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps_per_step: int = eqx.field(static=True, default=64)
    # stop with ``dt_min_reached`` below this step size (None: never; see :func:`min_step`)
    min_step: float | None = eqx.field(static=True, default=None)
    # the floor of a rod's own tolerance on its half-vector r (and its velocity), relative to
    # |r| in between; None: ``atol`` (see :func:`half_atol` and :class:`HalfTolerance`)
    half_atol: float | None = eqx.field(static=True, default=None)
    # the step-size controller's proportional and integral coefficients (diffrax's defaults,
    # 0 and 1, are an I controller; :func:`stiff_solver` uses a PI controller)
    pcoeff: float = eqx.field(static=True, default=0.0)
    icoeff: float = eqx.field(static=True, default=1.0)
    # the budget enforced as the solve goes (:class:`PacedBudget`): at most this many simulated
    # steps' worth of it spent ahead of the solve's progress; None: only the whole solve's budget
    reserve: int | None = eqx.field(static=True, default=None)

    @property
    def own_half_tolerance(self) -> bool:
        """Whether a rod's half-vector gets a tolerance of its own (:class:`HalfTolerance`)."""
        return self.half_atol is not None and self.half_atol != self.atol

    def max_steps(self, num_simulated_steps: int) -> int:
        """The solver-step budget for integrating ``num_simulated_steps`` optimizer steps."""
        return self.max_steps_per_step * max(int(num_simulated_steps), 1) + 16

    def controller(self) -> diffrax.PIDController:
        """The adaptive step-size controller: these tolerances and coefficients; below
        ``min_step`` the solve stops (``dt_min_reached``)."""
        return diffrax.PIDController(rtol=self.rtol, atol=self.atol, pcoeff=self.pcoeff, icoeff=self.icoeff,
                                     dtmin=self.min_step, force_dtmin=False)


class _NewtonKrylovState(eqx.Module):
    diffsize: jax.Array
    diffsize_prev: jax.Array
    result: optx.RESULTS
    step: jax.Array


class NewtonKrylov(optx.AbstractRootFinder):
    """Inexact Newton for diffrax's implicit stage relations, with a matrix-free linear solver.

    Each iteration linearises the relation at the current iterate (``jax.linearize``: a tape, no
    matrix) and solves for the update with ``linear_solver`` (:class:`KrylovGMRES`, on
    Jacobian-vector products), asked for a relative accuracy in the norm the iteration is judged
    in, ``|diff / (atol + rtol |y|)|`` (without that scaling GMRES's two-norm is dominated by the
    stiff components and leaves the others unresolved). Converged, as in
    :class:`diffrax.VeryChord`, when the estimated remaining error ``|diff| rate / (1 - rate)`` is
    below ``kappa`` tolerances (after at least two iterations); unlike VeryChord, an iteration that
    contracts but has not converged continues up to the solver's ``root_find_max_steps`` instead of
    failing at the second (inexact updates contract at about the Krylov tolerance, not
    quadratically), and a rate of 1 or more fails (diffrax then rejects the step and shrinks it).

    Measured against :class:`diffrax.VeryChord` with the same Krylov solver (one linearisation
    per step, README "Stiff stable flows"): the per-iteration linearisation costs one tape, and the
    exact Jacobian cut the linear solves by 5-30 % and step rejections by a third on the
    stiffest flow (scalar Adam on the MLP past step 500), 1.5x faster there.
    """

    rtol: float
    atol: float
    norm: Any = optx.rms_norm
    kappa: float = 1e-2
    linear_solver: lx.AbstractLinearSolver = eqx.field(default_factory=lambda: KrylovGMRES())
    rounding_floor: float = 100.0

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        if "init_state" in options:  # diffrax builds the state once per step and passes it per stage
            return options["init_state"]
        dtype = jnp.result_type(*jax.tree.leaves(y))
        return _NewtonKrylovState(jnp.array(jnp.inf, dtype), jnp.array(1.0, dtype), optx.RESULTS.successful,
                                  jnp.array(0))

    def step(self, fn, y, args, options, state, tags):
        del options
        fx, lin, aux = jax.linearize(lambda y_: fn(y_, args), y, has_aux=True)
        jac = lx.FunctionLinearOperator(lin, jax.eval_shape(lambda: y), tags=tags)
        with jax.numpy_dtype_promotion("standard"):
            weights = jax.tree.map(lambda v: self.atol + self.rtol * jnp.abs(v), y)
        options = {"scale": weights} if isinstance(self.linear_solver, KrylovGMRES) else {}
        sol = lx.linear_solve(jac, fx, self.linear_solver, options=options, throw=False)
        diff = sol.value
        new_y = jax.tree.map(lambda a, b: a - b, y, diff)
        with jax.numpy_dtype_promotion("standard"):
            scale = jax.tree.map(lambda v: self.atol + self.rtol * jnp.abs(v), new_y)
            diffsize = self.norm(jax.tree.map(lambda a, b: a / b, diff, scale))
        new_state = _NewtonKrylovState(jnp.asarray(diffsize, state.diffsize.dtype), state.diffsize,
                                       optx.RESULTS.promote(sol.result), state.step + 1)
        return new_y, new_state, aux

    def terminate(self, fn, y, args, options, state, tags):
        del fn, y, args, options, tags
        at_least_two = state.step >= 2
        rate = state.diffsize / state.diffsize_prev
        finfo = jnp.finfo(state.diffsize.dtype)
        factor = state.diffsize * rate / (1 - rate)
        small = state.diffsize < 10 ** (2 - finfo.precision)
        diverged = ~jnp.isfinite(rate) | (rate >= 1)
        converged = (factor > 0) & (factor < self.kappa)
        # An update below ``rounding_floor`` rounding units of the iterate (``diffsize`` is in
        # tolerance units, so that is ``rounding_floor eps / rtol`` of them) cannot contract any
        # further: it is the floor set by evaluating the relation in finite precision, and a rate
        # of 1 there means "stalled at the floor", not "diverging". In float32 at rtol 1e-5 the
        # convergence test asks for kappa rtol = 1e-7, about one eps, so without this rule many
        # Newton failures were such stalls: the step was rejected and dt cut 5x. Measured
        # (benchmarks/float32_stiff.py, float32, 2 cores): deep-linear RMSProp 49,970 solver steps
        # (13,029 rejected) -> 89 (0), NAdam budget hit -> 51 steps; an unseen 112-parameter tanh
        # network, Adam 3,163 -> 47, NAdam 12,502 -> 43; errors against the discrete run unchanged
        # to 3 digits. In float64 the floor is 2e-7 tolerance units: never reached.
        stalled = jnp.isfinite(rate) & (rate >= 1) & (state.diffsize < self.rounding_floor * finfo.eps / self.rtol)
        done = at_least_two & (small | converged | stalled)
        fail = at_least_two & ~done & diverged
        linsolve_fail = state.result != optx.RESULTS.successful
        result = optx.RESULTS.where(linsolve_fail, state.result,
                                    optx.RESULTS.where(fail, optx.RESULTS.nonlinear_divergence,
                                                       optx.RESULTS.successful))
        return done | fail | linsolve_fail, result

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return y, aux, {}


class KrylovGMRES(lx.AbstractLinearSolver):
    """Unrestarted GMRES that stops as soon as the residual is small: matrix-free, one
    operator-vector product (a Jacobian-vector product of the vector field) per iteration.

    ``lineax.GMRES`` runs whole restart cycles of ``restart`` products and then needs a second
    cycle before its Cauchy test on the solution can pass, so a solve costs at least
    ``2 restart + 3`` products. The stable flows' stage systems ``I - gamma h J`` start with a
    few stiff outlying eigenvalues and a cluster at 1 (2-10 products); as the flow sharpens the
    stiff part becomes a continuum (scalar Adam's MLP flow at step 450: 120 eigenvalues of
    ``gamma h J`` beyond 1, ``sqrt(kappa)`` 29, 36 products; ``benchmarks/stiff_spectrum.py``),
    where the products grow like ``sqrt(kappa)`` and deflating even the 64 stiffest exact
    eigenvectors saves under half. Stops at ``|b - A x| <= rtol |b|`` (two-norm over the
    flattened pytree), or fails with ``max_steps_reached`` after ``max_steps`` products (the
    caller's Newton iteration then fails and diffrax retries the step with a smaller ``dt``).
    """

    rtol: float = 1e-2
    atol: float = 0.0
    max_steps: int = eqx.field(static=True, default=40)

    def init(self, operator, options):
        del options
        return operator

    def compute(self, state, vector, options):
        op = state
        b, unravel = jax.flatten_util.ravel_pytree(vector)
        dtype, n = b.dtype, b.size
        # optional diagonal scaling W (a pytree like the vector): GMRES on W^-1 A W z = W^-1 b
        w = options.get("scale")
        w = jnp.ones_like(b) if w is None else jax.flatten_util.ravel_pytree(w)[0]
        b = b / w
        m = min(self.max_steps, n)
        beta = jnp.linalg.norm(b)
        target = jnp.maximum(self.rtol * beta, self.atol * jnp.sqrt(n))  # atol: on the RMS residual
        V = jnp.zeros((m + 1, n), dtype).at[0].set(b / jnp.where(beta > 0, beta, 1))
        R = jnp.zeros((m + 1, m), dtype)
        cs = jnp.zeros(m, dtype)
        sn = jnp.zeros(m, dtype)
        g = jnp.zeros(m + 1, dtype).at[0].set(beta)

        def cond(c):
            k, _, _, _, _, g, done = c
            return (k < m) & ~done & (jnp.abs(g[k]) > target)

        def body(c):
            k, V, R, cs, sn, g, _ = c
            v = jax.flatten_util.ravel_pytree(op.mv(unravel(w * V[k])))[0] / w

            def orthogonalise(j, vh):  # modified Gram-Schmidt over the k + 1 basis vectors so far only
                v, h = vh
                hj = V[j] @ v
                return v - hj * V[j], h.at[j].set(hj)

            v, h = jax.lax.fori_loop(0, k + 1, orthogonalise, (v, jnp.zeros(m + 1, dtype)))
            hn = jnp.linalg.norm(v)
            V = V.at[k + 1].set(v / jnp.where(hn > 0, hn, 1))
            col = h.at[k + 1].set(hn)

            def rotate(i, col):
                a, bb = col[i], col[i + 1]
                return col.at[i].set(cs[i] * a + sn[i] * bb).at[i + 1].set(-sn[i] * a + cs[i] * bb)

            col = jax.lax.fori_loop(0, k, rotate, col)
            a, bb = col[k], col[k + 1]
            r = jnp.hypot(a, bb)
            c_, s_ = jnp.where(r > 0, a / jnp.where(r > 0, r, 1), 1.0), jnp.where(r > 0, bb / jnp.where(r > 0, r, 1), 0.0)
            col = col.at[k].set(r).at[k + 1].set(0.0)
            R = R.at[:, k].set(col)
            g = g.at[k + 1].set(-s_ * g[k]).at[k].set(c_ * g[k])
            # lucky breakdown: the Krylov space is invariant and the solution exact
            done = hn <= 16 * jnp.finfo(dtype).eps * jnp.linalg.norm(h)
            return k + 1, V, R, cs.at[k].set(c_), sn.at[k].set(s_), g, done

        k, V, R, _, _, g, _ = jax.lax.while_loop(cond, body, (0, V, R, cs, sn, g, beta == 0))
        i = jnp.arange(m)
        used = i < k
        Rm = jnp.where(used[:, None] & used[None, :], R[:m], jnp.eye(m, dtype=dtype))
        y = jax.scipy.linalg.solve_triangular(Rm, jnp.where(used, g[:m], 0.0), lower=False)
        x = w * (y @ V[:m])
        ok = jnp.abs(g[k]) <= target
        result = lx.RESULTS.where(ok, lx.RESULTS.successful, lx.RESULTS.max_steps_reached)
        return unravel(x), result, {"num_steps": k, "max_steps": self.max_steps}

    def transpose(self, state, options):
        return state.transpose(), {}

    def conj(self, state, options):
        return lx.conj(state), {}

    def assume_full_rank(self):
        return True


def implicit_solver(*, krylov_rtol: float = 1e-2, krylov_atol: float = 1e-1, krylov_steps: int = 40,
                    rounding_floor: float = 100.0) -> diffrax.Kvaerno5:
    """Kvaerno5 (5th-order L-stable ESDIRK) with a matrix-free Newton-Krylov stage solver
    (:class:`NewtonKrylov` + :class:`KrylovGMRES`): no Jacobian matrix is formed or factorised.

    Each Newton update is solved to ``krylov_rtol`` relative / ``krylov_atol`` RMS accuracy in the
    step-size controller's tolerance units (so the iteration converges to a small fraction of
    the tolerance), with at most ``krylov_steps`` Jacobian-vector products. A Newton iteration
    whose updates have stalled below ``rounding_floor`` rounding units of the iterate counts as
    converged (:meth:`NewtonKrylov.terminate`; 0 turns the rule off).
    """
    linear = KrylovGMRES(krylov_rtol, krylov_atol, krylov_steps)
    finder = diffrax.with_stepsize_controller_tols(NewtonKrylov)(linear_solver=linear, rounding_floor=rounding_floor)
    return diffrax.Kvaerno5(root_finder=finder)


def default_tolerances(dtype) -> tuple[float, float]:
    return (1e-7, 1e-9) if jnp.dtype(dtype) == jnp.float64 else (1e-5, 1e-7)


def stiff_tolerances(dtype) -> tuple[float, float]:
    """The stiff stable flows' tolerances: 10x looser than :func:`default_tolerances` in float64
    (rtol 1e-6 / atol 1e-8), the same in float32 (1e-5 / 1e-7: about what float32 resolves).

    Why (measured, README "Stiff stable flows"): a stable flow is the baseline whose distance
    from the optimizer is measured, and that distance is 0.1-3 of the path at the edge (0.002 at
    the least, over the grid's stiff cells). At rtol 1e-6 the solve stays within 2e-5 of a tight
    reference, relative to the path (at 1e-7: 1.2e-6), and takes 1.4-1.6x fewer Jacobian-vector
    products (mlp-digits, six adaptive optimizers, 600 steps; the transformer's Adam and scalar
    NAdam 1.43x). The rods keep the tight tolerances: their catapults grow from what the solve
    leaves of r."""
    return (1e-6, 1e-8) if jnp.dtype(dtype) == jnp.float64 else default_tolerances(dtype)


def stiff_solver(dtype) -> SolverConfig:
    """The configuration for stiff flows: :func:`implicit_solver` at :func:`stiff_tolerances`, with
    the explicit default's budget (it takes 0.3-3 steps per simulated step; a budget hit means
    the Newton-Krylov iterations kept failing, e.g. on a vector field that is not finite), and a
    PI step-size controller (``pcoeff = icoeff = 0.3``, one of diffrax's suggestions for mildly
    stiff problems).

    Why PI (README, "Stiff stable flows"): where the flow sharpens, many steps that the error
    estimate accepts are ones whose Newton iteration diverges. A failed stage cuts ``dt`` 5x and
    the I controller grows it back 10x at the next accepted step, into the next failure; on
    scalar Adam's MLP stable flow over steps 450-600 that rejected 201 of 479 steps. The PI
    controller grows ``dt`` gradually: 29 of 237 rejected, 2.3x fewer Jacobian-vector products,
    the same distance to a tight reference (1e-8 of the path)."""
    rtol, atol = stiff_tolerances(dtype)
    return SolverConfig(implicit_solver(), rtol, atol, 64, min_step(dtype), pcoeff=0.3, icoeff=0.3)


def implicit_retry(config: SolverConfig, dtype) -> SolverConfig:
    """What an explicit solve that ran out of its budget is retried with: :func:`stiff_solver`, at
    ``config``'s own tolerances (a retried rod keeps its accuracy, and its half tolerance)."""
    return dataclasses.replace(stiff_solver(dtype), rtol=config.rtol, atol=config.atol, half_atol=config.half_atol)


def is_stiff(flow: AbstractFlow) -> bool:
    """The stable flow of an adaptive optimizer (its preconditioned sharpness grows without bound
    along it), or of an optimizer without an analytic threshold (``from_optax``)."""
    opt = flow.optimizer
    return isinstance(flow, StableFlow) and (isinstance(opt, AbstractAdaptiveOptimizer) or not opt.analytic_threshold)


def is_implicit(config: SolverConfig) -> bool:
    return isinstance(config.solver, diffrax.AbstractImplicitSolver)


def solver_name(config: SolverConfig) -> str:
    """``"Tsit5"``, ``"Kvaerno5+GMRES"`` (:func:`implicit_solver`), ...: what a record reports."""
    name = type(config.solver).__name__
    root = getattr(config.solver, "root_finder", None)
    if isinstance(getattr(root, "linear_solver", None), KrylovGMRES):
        name += "+GMRES"
    if config.own_half_tolerance:
        name += f" (r tol >= {config.half_atol:.0e})"
    return name


def half_atol(dtype, atol: float) -> float:
    """The floor of the second-order rods' tolerance on ``r`` (:class:`HalfTolerance`: relative to
    ``|r|`` above it, up to the centre's ``atol``).

    float64: ``eps^2`` (5e-32), i.e. ``r`` is held to a tolerance relative to its own size at any
    size that occurs. Before the edge ``r`` decays to the level at which the rounding of each step
    holds it (the rounding seed, :meth:`~rodflow_jax.flows.RodFlow.add_rounding_seed`: about
    1e-17-1e-15 times ``|c|``), and the first catapult grows from there; a floor above that level
    puts the solver's error in the seed's place (the floor was ``1e-3 atol = 1e-12`` until stop 34;
    at ``atol`` itself, ~1e-8 on mlp-digits, the corrected rod fired 20-22 steps early). The field
    samples short rods at length ``sqrt(u) |c|`` (:meth:`~rodflow_jax.flows.RodFlow.sampled_half`),
    so ``r``'s part of it is not rounding noise at any size.

    float32: ``atol`` itself. Its rounding seed, ``~u |c|`` with ``u = 6e-8``, is at the solver's
    ``atol`` (1e-7) already, and the sampled difference rounds to a relative ``sqrt(u) = 2.4e-4``,
    above float32's ``rtol`` (1e-5): a relative tolerance there would chase rounding.
    """
    if jnp.dtype(dtype) != jnp.float64:
        return atol
    return min(atol, float(jnp.finfo(dtype).eps) ** 2)


def default_solver(flow: AbstractFlow, dtype, *, differentiable: bool = False) -> SolverConfig:
    """Tsit5 with a PID controller at tight tolerances, with a step budget per simulated step;
    :func:`stiff_solver` (matrix-free implicit) for the stiff flows (:func:`is_stiff`).

    Measured (README, "Stiff stable flows"): on the stiff flows explicit Tsit5 is held to its
    stability limit and ran out of a 128-steps-per-step budget in 10 cells of the fidelity grid;
    a Kvaerno5 with diffrax's default root finder (which materialises and LU-factors the
    Jacobian) was slower still on the 2,410-parameter MLP. A flow whose explicit solve still
    exhausts its budget is retried with :func:`stiff_solver` by the batched solve
    (:func:`rodflow_jax.experiments._engine.solve_batch`).

    ``differentiable=True`` (hypergradients) keeps Tsit5 for the stiff flows too, with the budget
    they had (128 per step): reverse mode through an implicit step differentiates each stage's
    root find by the implicit-function theorem, which optimistix does with a dense LU of the stage
    Jacobian (``n`` JVPs and ``n^3`` per stage and step): 27.5 s against 0.1 s for Tsit5 on the
    deep linear network (481 states, 50 steps), and out of reach on the MLP.
    """
    if isinstance(flow, SecondOrderFlow):
        # the corrected field damps the mu ~ -1 modes at rate ~4 instead of ~2: twice the budget
        base = default_solver(flow.inner, dtype, differentiable=differentiable)
        # and a solve outside the correction's range stalls at once: paced, it stops within 16
        # steps' worth of budget and its fallback takes over (:class:`PacedBudget`)
        return dataclasses.replace(base, max_steps_per_step=2 * base.max_steps_per_step, reserve=16,
                                   half_atol=half_atol(dtype, base.atol) if flow.models_oscillation else None)
    rtol, atol = default_tolerances(dtype)
    if is_stiff(flow):
        return SolverConfig(diffrax.Tsit5(), rtol, atol, 128) if differentiable else stiff_solver(dtype)
    return SolverConfig(diffrax.Tsit5(), rtol, atol, 64)


class _Wrapped(diffrax.AbstractAdaptiveStepSizeController):
    """A step-size controller that is its inner ``controller`` with one thing changed (its
    tolerances, norm and time direction are the inner one's)."""

    controller: Any

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):  # noqa: D102
        return self.controller.norm

    def wrap(self, direction):
        return eqx.tree_at(lambda c: c.controller, self, self.controller.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)


class HalfTolerance(_Wrapped):
    """``controller`` with a rod's oscillation part (``r``, and its velocity) held to a tolerance
    relative to the rod as a whole: ``clip(rtol |o|, half_atol, atol) + rtol |o_i|`` per component
    ``o_i`` of the oscillation ``o`` (``|o|`` its two-norm, the larger at the step's two ends),
    where every other component keeps ``atol + rtol |y_i|``.

    So a small or growing rod (before the edge, where it decays to the rounding seed that the
    first catapult grows from) is held to the relative accuracy ``rtol`` of its own size, down to
    ``half_atol`` (:func:`half_atol`: in float64 far below that seed), and a large one
    (``|o| >= atol / rtol``: at the edge, whose flat components are tiny) to the centre's ``atol``. A per-component ``half_atol``
    (stop 20-29: ``r`` integrated as ``r atol / half_atol``) held those flat components of a
    large rod to ``half_atol`` too: on mlp-digits (GD, ``rod2``, 1,000 steps) it cost 1.75x the
    solver steps after the first catapult and about the same before it.

    Implemented by weighting the oscillation part of the error estimate before ``controller``
    judges it (``(atol + rtol a_i) / (tol + rtol a_i)``); everything else is ``controller``'s.
    """

    flow: AbstractFlow  # whose ``oscillation(y)`` is ``y`` with all but its oscillation part zero
    half_atol: float = eqx.field(static=True)

    def weighted_error(self, y0, y1, y_error):
        """``y_error`` with its oscillation part rescaled so that ``controller``'s per-component
        tolerance ``atol + rtol a_i`` reads as ``clip(rtol |o|, half_atol, atol) + rtol a_i``."""
        rtol, atol = self.controller.rtol, self.controller.atol
        o0, o1 = self.flow.oscillation(y0), self.flow.oscillation(y1)
        size = jnp.maximum(tree_norm(o0), tree_norm(o1))
        tol = jnp.clip(rtol * size, self.half_atol, atol)

        def weight(e, eo, a0, a1):
            a = jnp.maximum(jnp.abs(a0), jnp.abs(a1))
            return e + eo * ((atol + rtol * a) / (tol + rtol * a) - 1.0)

        return jax.tree.map(weight, y_error, self.flow.oscillation(y_error), o0, o1)

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        if y_error is not None:
            y_error = self.weighted_error(y0, y1_candidate, y_error)
        return self.controller.adapt_step_size(t0, t1, y0, y1_candidate, args, y_error, error_order,
                                               controller_state)


class PacedBudget(_Wrapped):
    """``controller`` with the solve's step budget enforced as it goes: it stops with
    ``max_steps_reached`` once it has taken more than ``per_step (t - t_0 + reserve) + 16``
    steps, ``t`` the time it has reached (in optimizer steps). The whole solve's budget is
    ``per_step (t_1 - t_0) + 16`` (:meth:`SolverConfig.max_steps`), so a solve that keeps pace
    is not affected; one that stalls stops after ``reserve`` steps' worth instead of the whole.

    Measured where it matters: a second-order rod started inside the initial catapult of an
    unseen softplus network (GD 0.15 and 0.5, 600 simulated steps from step 0, started at 4.4x
    and 14x its threshold) spent its whole budget (130,960 solver steps: 128 a step over the
    solve's padded 1,024-step grid) short of step 1 before its fallback ran, 13-15 minutes per
    ``compare`` on 2 cores; paced, it stops after 2,065-2,119 steps and the same ``compare``
    takes 66-76 s, with the same results. The grid's second-order rods that run to the end take
    1.4-2.8 solver steps per simulated step: a 2,048-step reserve leaves them untouched.

    ``stop`` (a time, traced; ``None`` or ``inf``: none): where the solve will be stopped by its
    event (:func:`solve`'s ``stop_at``, a discrete run that diverged there). Its budget is then
    that of the window it integrates, ``per_step (stop - t_0) + 16``, not of the whole grid.
    Measured where it matters: a sweep row at GD 60 whose discrete run diverges at step 2 spent
    its whole 40-step budget (4,048 solver steps) on steps 0-2, in Tsit5 and then in the implicit
    retry (Newton-Krylov at every step): 21 s of a 26 s sweep of six tiny-MLP rows.
    ``reserve=None`` paces nothing else.
    """

    per_step: int = eqx.field(static=True)
    reserve: int | None = eqx.field(static=True)
    stop: Any = None

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        t, inner = super().init(terms, t0, t1, y0, dt0, args, func, error_order)
        return t, (inner, jnp.zeros((), jnp.int32), jnp.asarray(t0))

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state):
        inner, taken, start = controller_state
        keep, next_t0, next_t1, jump, inner, result = self.controller.adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, inner)
        taken = taken + 1
        stalled = jnp.zeros((), bool)
        if self.reserve is not None:
            stalled = taken > self.per_step * (t0 - start + self.reserve) + 16
        if self.stop is not None:  # (never, for a stop at inf)
            stalled = stalled | (taken > self.per_step * (self.stop - start) + 16)
        result = diffrax.RESULTS.where(stalled, diffrax.RESULTS.max_steps_reached, result)
        return keep, next_t0, next_t1, jump, (inner, taken, start), result


def step_size_controller(flow: AbstractFlow, config: SolverConfig, stop=None):
    """``config``'s controller, wrapped in :class:`HalfTolerance` where ``config`` holds a rod's
    oscillation to its own ``half_atol``, and in :class:`PacedBudget` where it has a ``reserve``
    or the solve a ``stop`` (its budget is then the window's up to ``stop``)."""
    controller = config.controller()
    if config.own_half_tolerance and flow.models_oscillation:
        controller = HalfTolerance(controller, flow, config.half_atol)
    if config.reserve is not None or stop is not None:
        controller = PacedBudget(controller, config.max_steps_per_step, config.reserve, stop)
    return controller


class Solution(NamedTuple):
    """What :func:`solve` returns: pure arrays, so it vmaps and differentiates."""

    loss: jax.Array  # (n,) predicted time-averaged loss at ``ts``
    half_norm: jax.Array  # (n,) |r| at ``ts`` (0 for a flow without a rod)
    centre: Any  # centre params at ``param_ts`` (leading axis m)
    slow: Any  # slow state at ``param_ts``
    variance: jax.Array  # (m,) the flow's predicted oscillation variance at ``param_ts``
    result: jax.Array  # diffrax's result code
    num_steps: jax.Array
    num_rejected_steps: jax.Array


def solve(flow: AbstractFlow, y0, ts, param_ts, config: SolverConfig, *, stop_at=None, adjoint=None,
          progress: bool = False) -> Solution:
    """The one diffeqsolve every driver uses: from ``ts[0]`` to ``ts[-1]`` (time in optimizer
    steps), saving the predicted loss and |r| at ``ts`` and the centre, slow state and predicted
    variance at ``param_ts``.

    Pure (no host syncs): jit, vmap and (with ``adjoint``, default diffrax's
    ``RecursiveCheckpointAdjoint``) differentiate it. ``stop_at`` (a time, traced) stops the
    solve there by an event (a sweep stops each configuration where its discrete run diverged);
    an event also stops a state that blows up (norm above ``1e6 (1 + |y0|)``) or stops being
    finite, so it does not burn the step budget. Saved times past the stop are non-finite.
    """

    def save_scalar(t, y, args):
        return flow.predicted_loss(y), flow.half_norm(y)

    def save_state(t, y, args):
        return flow.centre(y).params, flow.slow(y), flow.predicted_variance(y)

    saveat = diffrax.SaveAt(
        subs=[diffrax.SubSaveAt(ts=ts, fn=save_scalar), diffrax.SubSaveAt(ts=param_ts, fn=save_state)]
    )
    bound = 1e6 * (1.0 + tree_norm(y0))
    stop = jnp.asarray(jnp.inf if stop_at is None else stop_at, ts.dtype)

    def halt(t, y, args, **kw):
        return (~(tree_all_finite(y) & (tree_norm(y) < bound))) | (t >= stop)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(flow.ode_field),
        config.solver,
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=y0,
        saveat=saveat,
        stepsize_controller=step_size_controller(flow, config, None if stop_at is None else stop),
        max_steps=config.max_steps(int(ts.shape[0]) - 1),
        throw=False,
        event=diffrax.Event(halt),
        adjoint=adjoint if adjoint is not None else diffrax.RecursiveCheckpointAdjoint(),
        progress_meter=diffrax.TqdmProgressMeter() if progress else diffrax.NoProgressMeter(),
    )
    (loss, hn), (centre, slow, var) = sol.ys
    return Solution(loss, hn, centre, slow, var, sol.result._value, sol.stats["num_steps"],
                    sol.stats["num_rejected_steps"])


def min_step(dtype) -> float:
    """The step size (in optimizer steps) below which an implicit solve stops, ``dt_min_reached``.

    No solve that is merely stiff gets near it (the implicit solver takes steps of 0.1-5 however
    stiff the flow): every step being rejected until ``dt`` collapses means that the vector field
    is singular or not finite just ahead, i.e. the flow leaves its domain of validity there, and
    the record says so. (The explicit default has none: adding one to its controller changed
    XLA's rounding of the rod flow, whose chaotic edge dynamics amplify it past the golden
    tests' 1e-6; such a solve runs out of its budget instead and is retried implicitly.)"""
    return 1e-9 if jnp.dtype(dtype) == jnp.float64 else 1e-6


def result_message(code: int, dtype=None) -> str:
    """diffrax's result code as a word (``""`` for success), for a solve in ``dtype``.

    Every step rejected down to :func:`min_step` means the field is singular just ahead in float64.
    In a narrower dtype it may be rounding instead: measured on a tanh network's RMSProp stable
    flow that stops so in float32 (``nu`` down to 3e-8), the same state steps at ``dt`` 0.1 in
    float64 arithmetic where float32 fails down to ``dt`` 1e-4 (README, "Float32: the Newton stall
    rule"), so the message does not claim the domain there and says what to rerun."""
    for name in ("successful", "max_steps_reached", "event_occurred", "dt_min_reached", "singular", "breakdown",
                 "nonfinite"):
        member = getattr(diffrax.RESULTS, name, None)
        if member is not None and int(member._value) == int(code):
            if name == "event_occurred":
                return "blew up (state norm above 1e6 (1 + |y0|), or not finite)"
            if name == "dt_min_reached":
                if dtype is not None and jnp.dtype(dtype).itemsize < 8:
                    return (f"stalled: every step was rejected until the step size fell below the minimum; in "
                            f"{jnp.dtype(dtype).name} this can be rounding rather than the flow leaving its "
                            f"domain: rerun in float64 (--float64) to tell")
                return ("left its domain: every step was rejected until the step size fell below the minimum "
                        "(the vector field is singular or not finite just ahead)")
            return "" if name == "successful" else name
    return "solver failure"


class FlowRun(NamedTuple):
    """What one integrated flow returns (arrays over the saved steps)."""

    steps: np.ndarray  # (n,) integer steps k at which the flow was saved
    loss: np.ndarray  # (n,) predicted time-averaged loss
    half_norm: np.ndarray | None  # (n,) |r| in parameter space (rod only)
    centre: Any  # pytree of arrays with leading axis (m,): centre params at ``param_steps``
    param_steps: np.ndarray  # (m,)
    slow: Any  # slow state at ``param_steps`` (for preconditioned probes)
    failed: bool
    failed_at: int | None  # first saved step that is not finite, if the solve failed
    message: str
    solver_steps: int
    rejected_steps: int


@eqx.filter_jit
def _solve_jit(flow, y0, ts, param_ts, config, progress):
    return solve(flow, y0, ts, param_ts, config, progress=progress)


def integrate(
    flow: AbstractFlow,
    y0,
    start_step: int,
    end_step: int,
    *,
    param_steps=None,
    config: SolverConfig | None = None,
    progress: bool = False,
) -> FlowRun:
    """Integrate ``flow`` from step ``start_step`` to ``end_step`` (time is in optimizer steps).

    Saves the predicted loss (and the rod's |r|) at every integer step, and the centre's
    parameters and slow state at ``param_steps`` (default: every step). A failed solve (step
    budget exhausted, non-finite state) is reported in ``failed``/``failed_at``, never raised.
    """
    if not end_step > start_step:
        raise InputError(f"end_step must come after start_step, got {start_step} .. {end_step}")
    dtype = jax.tree.leaves(y0)[0].dtype
    if config is None:
        config = default_solver(flow, dtype)
    steps = np.arange(start_step, end_step + 1)
    param_steps = steps if param_steps is None else np.asarray(param_steps)
    ts = jnp.asarray(steps, dtype)
    pts = jnp.asarray(param_steps, dtype)
    sol = _solve_jit(flow, y0, ts, pts, config, progress)
    loss = np.asarray(sol.loss)
    finite = np.isfinite(loss)
    ok = int(sol.result) == int(diffrax.RESULTS.successful._value)
    failed = bool(not ok or not finite.all())
    failed_at = int(steps[np.argmin(finite)]) if not finite.all() else (int(steps[-1]) if failed else None)
    return FlowRun(
        steps=steps,
        loss=loss,
        half_norm=np.asarray(sol.half_norm) if flow.models_oscillation else None,
        centre=jax.tree.map(np.asarray, sol.centre),
        param_steps=param_steps,
        slow=jax.tree.map(np.asarray, sol.slow),
        failed=failed,
        failed_at=failed_at,
        message=(result_message(int(sol.result), dtype) or "non-finite state") if failed else "",
        solver_steps=int(sol.num_steps),
        rejected_steps=int(sol.num_rejected_steps),
    )
