r"""The second-order (backward-error-corrected) generator, written once for every flow.

The rod and stable flows use the generator ``v(y) = R(y) - y`` of their one-step map ``R``. Its
unit-time map ``phi_1(y) = y + v + (1/2) Dv[v] + O(v^3)`` agrees with ``R(y) = y + v`` only to
first order. Backward error analysis (Hairer, Lubich & Wanner, *Geometric Numerical
Integration*, ch. IX) gives the field whose unit-time map is ``R`` to second order,

.. math::

    f = v - \tfrac12\, Dv[v] + O(v^3),

evaluated by default in float64 as a forward difference of ``v`` along itself,
``v - (v(y + v/100) - v)/(2/100)`` (``derivative="fd"``: two evaluations of ``v``), and in float32
(``derivative="auto"`` picks) or on request with one Jacobian-vector product of ``v``
(``derivative="jvp"``: forward over the reverse-mode gradients inside ``v``), or as
``2 v(y) - v(y + v/2)`` (``derivative="difference"``; *Cost*, below).

*On a linear mode.* If ``R`` multiplies a mode by ``mu``, the three generators move it by

    first order   exp(mu - 1)                  error  (mu - 1)^2 / 2
    second order  exp((mu-1) - (mu-1)^2/2)     error -(mu - 1)^3 / 3
    exact         exp(log mu) = mu             (real only for mu > 0)

For GD on a quadratic the rod's r-mode has ``mu = eta lambda - 1`` after the flip; with
``eps = eta lambda - 2`` the first-order flow grows it by ``e^eps`` per step instead of
``1 + eps`` (the early first catapult), the second-order flow by ``e^{eps - eps^2/2}``
(``1 + eps - eps^3/3 + O(eps^4)``). At ``eps = 0.2`` (sharpness 1.1x the threshold) the
per-step factor errors are 2.1e-2 and 2.5e-3; at ``eps = 0.5``, 0.149 and 0.045 (tests).

*Is there a better principled construction?* The exact generator is ``log R``, which for a
linear mode is ``log mu``: the Lie series continues ``+ (1/3)(mu-1)^3 - ...`` and the
nonlinear third-order term needs a second derivative of ``v`` (``D^2 v[v, v]``) as well as
``Dv[Dv[v]]``: two more nested JVPs per evaluation. The series converges only for
``|mu - 1| < 1``, and three limits make the second-order polynomial ``q(x) = x - x^2/2``
(``x = mu - 1``) the sensible place to stop:

- the modes that matter for catapults have ``|x|`` small (the r-mode at the edge:
  ``x = eps``; the slow centre modes: ``x = -eta lambda``), where ``q`` is within ``|x|^3/3``;
- modes with ``mu < 0`` (the rod's r-modes along flat directions, ``mu ~ -1``; the centre's
  sharp mode, ``mu = 1 - eta lambda ~ -1``) have no real logarithm at all. Both generators
  damp them, the first-order one at rate ``|x| <= 2``, the second-order one at ``|q(x)| <= 4``:
  the corrected flow is about twice as stiff (measured: 1.5-1.7x the solver steps for GD on
  mlp-digits, ``benchmarks/second_order.py``);
- ``q`` peaks at ``x = 1`` and is negative for ``x > 2``: an r-mode with ``mu > 2`` grows
  *more slowly* than at ``mu = 2``, and one with ``mu > 3`` is damped. For GD (``mu = eta
  lambda - 1``) that is 1.5x and 2x the threshold, outside the edge of stability (mlp-digits:
  at most 1.25x). For heavy ball the flipped r-multiplier moves ``1/(1 - beta)`` times faster
  (``d mu / d(eta lambda) = 1/(1 - beta)`` at the threshold): at momentum 0.9, ``mu = 2`` at
  1.14x and ``mu = 3`` at 1.37x the threshold. Measured on mlp-digits (heavy ball, 0.3, 0.9):
  the corrected rod's r-mode cannot keep up with the sharpening, the sharpness overshoots to
  1.5x, the loss spikes at step 88 (discrete: 45) and the rod lands at 2.5x the threshold,
  where its r-mode is damped: ``|r|`` sits at rounding level for the rest of the run, no
  catapult follows, and the solve costs ~15 solver steps per step (``|q| ~ 15`` there). So
  the correction is for rods whose r-multiplier stays within ``|mu - 1| < 1`` (GD-like); with
  momentum it is not usable. Adam's ``(w, m)`` rod has the same structure (``det = b1``); not
  measured on a real run.

*Exact growth along the oscillation* (``exact_growth``, the ``rod2`` construction; without it
``rod2_plain``). The catapult is timed by how fast ``|r|`` grows, and there ``q`` is worst
exactly where the sharpness overshoots: at 1.5x the threshold (GD, ``x = 1``) the map doubles the
r-mode per step and the corrected flow multiplies it by ``e^0.5 = 1.65`` (the first-order one by
``e = 2.72``). Along the rod's own half-vector the exact rate is available for free: with ``o``
the oscillation part of ``y`` (``r``, and its velocity for an inertial rod) and ``x = <o, v>/|o|^2``
the first-order field's rate along it (``mu - 1`` when ``o`` is a mode of multiplier ``mu``), the
field gains ``(log(1 + x) - q(x)) o`` where ``x > 0``. On a growing mode the unit-time map is then
the rod map's ``mu`` exactly, at any overshoot; decaying modes (``x <= 0``, where ``log`` may not
exist) and the centre keep ``q``. The term is ``x^3/3 + O(x^4)``, so the field stays C^2 and second
order; it is odd in ``r`` (the symmetry holds) and vanishes at ``r = 0`` (the stable-flow limit
holds); it costs two inner products. Measured (first catapult, model minus discrete, float64,
600 steps, period-2 start; ``rod2_plain`` -> ``rod2``): an unseen tanh network (GD 0.4, sharpness
overshooting to 1.5x) +29 -> 0; deep-linear scalar RMSProp +7 -> 0; toy RMSProp +8 -> -1;
mlp-digits Nesterov 0.5 +6 -> +1 (max error 0.32 -> 0.10); heavy ball 0.5 on mlp-digits, where
the plain rod overshoots past its margin, +143 -> +10 (final error 1.74 -> 0.45, solver steps
13,527 -> 2,664); mlp-digits GD -5 -> -8.

A Pade (1,1) generator ``2 (R - I)(R + I)^{-1}`` would be third-order accurate (error
``x^3/12``) and monotone, but needs a linear solve with the Jacobian of ``R`` per evaluation
and is singular exactly at the ``mu = -1`` modes that every rod has; it is not used.

*Other flows.* The wrapper takes any flow and corrects *its* field ``v``. For the rod and
stable flows that field is the map's increment, so ``f`` is the second-order generator of the
optimizer's rod (or one-step) map, for all nine optimizers. The inertial flows' field is not
``R - id`` (it is exact on the velocity contraction instead, at the rate
``-log(beta)/(1 - beta)``), and the correction breaks it: at a fixed point the corrected
Jacobian is ``J - J^2/2``, so an eigenvalue ``a`` becomes ``a - a^2/2`` and a rotation
``a = i w`` gains the growth rate ``w^2/2``. The inertial rod's ``rho``-block rotates at
``w ~ sqrt(kappa (2 + 2 beta)) ~ 2`` rad per step along flat directions: the corrected inertial
flow grows those modes by ``e^1.9`` per step (heavy ball and Nesterov at momentum 0.9, tests)
and blows up within a few steps. Wrapping an inertial flow is allowed (the construction is
generic) but not useful; for a momentum method correct its plain rod flow instead. A rod's field
has eigenvalues ``x = mu - 1`` and ``|mu| < 1`` implies ``Re q(x) < -(Re x)^2 <= 0`` (from
``(Im x)^2 < -2 Re x - (Re x)^2``): every mode the map damps, the corrected rod damps too.
The central flow's field runs Lanczos and a complementarity solve; it is not differentiable
everywhere and is not supported.

*Cost.* One linearisation of ``v`` plus one tangent pass per evaluation (measured 2.2-4.2x a
first-order evaluation: 2.2-2.9x on mlp-digits and the transformer, 3.3-4.2x on cnn-digits), and
the damped modes at twice the rate: 1.7x the solver steps on mlp-digits GD (since ``r`` is held
to a tolerance relative to its own size, ``rodflow_jax._integrate.HalfTolerance``; 2.6-2.9x
before): 3.9x the first-order rod's time per simulated step (README, "rod2's cost").

``derivative="difference"`` replaces the tangent pass by a second evaluation of ``v`` at
``y + v/2``: ``2 v - v(y + v/2) = v - (1/2) Dv[v] - (1/8) D^2v[v, v] + O(v^4)``, exactly the ``jvp``
form on a linear field and second order on any, for 2.0x a first-order evaluation, without
forward mode through the loss. It samples the field half a map step away, though, and where that
step is large against the state the two differ at first order: RMSProp from step 0 on deep-linear
(the slow state moves by twice itself per step there; ``|v| = 2.6 |y|``) stalls the explicit solve
at step 0 for any sample distance down to ``v/30``, where the ``jvp`` form runs. On 21 other rows
of the grid's rod2 cells it changed no catapult count and moved none by more than 5 steps, and on
mlp-digits GD it costs 3.4x the first-order rod per simulated step (the JVP: 3.9x). So it is not
the default.

``derivative="fd"`` (the default in float64 since stop 34, ``derivative="auto"``; float32 keeps the
``jvp`` form, whose rounding the forward difference would multiply by 50 to half float32's
``rtol``) samples close to ``y`` instead, at ``y + v/100``:
the ``jvp`` form's numbers up to ``-(1/400) D^2v[v, v]`` (the ``difference`` form's term is 50x
that), at the same cost as the ``difference`` form. On cnn-digits RMSProp (300 steps, default
start) it took 1.59x less time per simulated step than the ``jvp`` form (74 s against 118 s, 496
against 503 solver steps) with the same errors (final 0.0335 against 0.0332, the ``difference``
form 0.0395). At stop 33 it moved the catapults: where ``|r|`` was tiny (before the edge) the
r-part of ``v`` was the rounding of a difference of the endpoints' gradients, ``~u |g|``, which the
forward difference divides by ``a``, and the first catapult fired 6-12 steps earlier than the
``jvp`` rod's in 11 of 13 rows. Since the rod samples a short rod at ``sqrt(u) |c|`` and carries
its rounding seed explicitly (``flows/_rod.py``), ``v``'s r-part is exact at any size, and the two
forms agree: on the 20 rod2 rows of toy, deep-linear and mlp-digits (600 steps, both starts) every
catapult is on the same step and every final and max error within 0.5 % (README, "The rounding
seed"); on cnn-digits GD (600 steps) both fire at 293, 449, 549 (discrete 292, 449, 549) with
final / max error 0.0028 / 0.0225, in 148 s against 307 s (1,060 against 1,054 solver steps; two
runs side by side). On the toy it takes 15-25 % more solver steps than the ``jvp`` form, elsewhere
the same. ``jvp`` stays selectable (``flow_options={"rod2": {"derivative": "jvp"}}``).
A backward sample (``(3 v(y - v/3) - v)/2``, which matches the ``D^2 v`` term of ``log R``) can
also leave the domain: it takes a second moment far below ``g^2`` negative.

*The early first catapult.* The first-order rod's first catapult on mlp-digits (GD) comes 31
steps early at the default tolerance (rtol 1e-7, atol 1e-9), the corrected rod's 22 steps. Most
of the gap is not the generator but the seed: at that tolerance the explicit solver runs at the
stability limit of the ``mu ~ -1`` r-modes, which then sit at the tolerance (``|r| ~ 3e-8``
before the edge instead of ~1e-16) and seed the instability. At rtol 1e-9, atol 1e-11 both
rods reach rounding level before the edge and fire within 7 steps of the discrete run (first
order -7, second order -6).
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._host import to_host
from .._tree import tree_axpy, tree_sub, tree_sum_squares, tree_vdot
from ..optimizers import Phase
from ._base import AbstractFlow


# how SecondOrderFlow evaluates its correction (the first: default), and where the two
# finite-difference forms sample v: at y + a v, a fraction a of the map step
DERIVATIVES = ("auto", "fd", "jvp", "difference")


def resolve_derivative(derivative: str, dtype) -> str:
    """``"auto"`` (the default) is ``"fd"`` in float64 and ``"jvp"`` otherwise: the forward
    difference divides a difference of fields by ``2a = 1/50``, so its rounding is ``~50 u`` of ``|v|``,
    1e-14 in float64 (far below ``rtol`` 1e-7) but 6e-6 in float32, half its ``rtol`` (1e-5), where
    the controller reads it (measured: a float32 sweep's step counts then depend on the batch)."""
    if derivative != "auto":
        return derivative
    return "fd" if jnp.dtype(dtype) == jnp.float64 else "jvp"
SAMPLE_FRACTION = {"fd": 1e-2, "difference": 0.5}


def growth_correction(x):
    """``log(1 + x) - (x - x^2/2)`` for ``x > 0``, else 0: what turns the corrected rate ``q(x)`` of
    a growing mode into the exact ``log(1 + x)``. ``x^3/3 + O(x^4)``, so the field stays C^2 at 0."""
    xp = jnp.maximum(x, 0.0)
    return jnp.log1p(xp) - xp + 0.5 * xp * xp


class SecondOrderFlow(AbstractFlow):
    r"""``inner`` with its field ``v`` replaced by ``v - (1/2) Dv[v]`` and, with
    ``exact_growth``, the rate along the oscillation made exact where it grows (see the module:
    ``+ growth_correction(x) o`` with ``o`` the oscillation part of ``y`` and ``x = <o, v>/|o|^2``).

    Everything but the field (centre, predicted loss, slow state, ``|r|``, scaling) is the inner
    flow's, so the corrected flow starts from the inner flow's initial state and is read the
    same way; ``optimizer``, ``loss_fn`` and ``scale`` are the inner flow's.
    """

    inner: AbstractFlow
    exact_growth: bool = eqx.field(static=True)
    derivative: str = eqx.field(static=True)

    def __init__(self, inner: AbstractFlow, exact_growth: bool = False, derivative: str = DERIVATIVES[0]):
        if isinstance(inner, SecondOrderFlow):
            raise TypeError("the flow is already second order")
        if derivative not in DERIVATIVES:
            raise ValueError(f"derivative must be one of {DERIVATIVES}, got {derivative!r}")
        self.optimizer = inner.optimizer
        self.loss_fn = inner.loss_fn
        self.scale = inner.scale
        self.inner = inner
        self.exact_growth = bool(exact_growth)
        self.derivative = derivative

    def corrected_field(self, t, y, args):
        """``(v, v - (1/2) Dv[v] + ...)`` at ``y``: the first-order field and its second-order
        correction, by ``derivative`` (see the module, *Cost*):

        - ``"jvp"``: ``v - (1/2) Dv[v]`` with ``Dv[v]`` from one ``jax.jvp`` of
          ``v`` (forward over the reverse-mode gradients inside ``v``). ``jax.linearize`` would save
          its primal pass but stores the residuals of the endpoints' sequential loop and was 2.7x
          slower on cnn-digits (``benchmarks/endpoints.py``, stop 17);
        - ``"auto"`` (the default): ``"fd"`` in float64, ``"jvp"`` otherwise (:func:`resolve_derivative`);
        - ``"fd"``: ``Dv[v]`` by a forward difference, ``(v(y + a v) - v) / a`` with ``a = 1/100``:
          ``v - (1/2) Dv[v] - (a/4) D^2v[v, v] + O(a^2 v^4)``: the ``jvp`` form up to a
          third-order term 1/33 of the one by which the ``jvp`` form differs from ``log R``
          (``+(1/12) D^2v[v, v]``), plus a rounding error of about ``u/a`` times ``|v|`` (``u`` the
          unit roundoff); two evaluations of ``v`` and no forward mode: 1.6x faster than ``"jvp"``
          per simulated step on cnn-digits (module, *Cost*);
        - ``"difference"``: the same at ``a = 1/2``, ``2 v - v(y + v/2) = v - (1/2) Dv[v] - (1/8)
          D^2v[v, v] + O(v^4)``: 2.5x the ``jvp`` form's third-order error against ``log R``, and
          wrong where a map step is large against the state (the module).

        All three are exactly equal on a linear field. ``y + a v`` lies between ``y`` and the map's
        image ``y + v``, so it is a valid state wherever both are and the state space is convex
        (second moments >= 0); a backward sample such as ``y - v/3`` is not."""
        f = lambda z: self.inner.vector_field(t, z, args)  # noqa: E731
        v = f(y)
        derivative = resolve_derivative(self.derivative, jax.tree.leaves(y)[0].dtype)
        if derivative == "jvp":
            return v, tree_axpy(-0.5, jax.jvp(f, (y,), (v,))[1], v)
        a = SAMPLE_FRACTION[derivative]  # v - (v(y + a v) - v) / (2 a); a = 1/2: 2 v - v(y + v/2)
        return v, tree_axpy(-0.5 / a, tree_sub(f(tree_axpy(a, v, y)), v), v)

    def growth_rate(self, y, v):
        """``x = <o, v>/|o|^2``: the first-order field's rate along the oscillation ``o`` of ``y``
        (``mu - 1`` when ``o`` is a mode with multiplier ``mu``; 0 where ``o = 0``)."""
        o = self.inner.oscillation(y)
        oo = tree_sum_squares(o)
        pos = oo > 0
        return jnp.where(pos, tree_vdot(o, v) / jnp.where(pos, oo, 1.0), 0.0), o

    def vector_field(self, t, y, args):
        v, f = self.corrected_field(t, y, args)
        if self.exact_growth:
            x, o = self.growth_rate(y, v)
            f = tree_axpy(growth_correction(x), o, f)
        return f

    @property
    def construction(self) -> str:
        """``rod2`` for the rod (``rod1``) with ``exact_growth``, ``rod2_plain`` without; likewise
        the inner flow's name with ``2`` for any other (``inertial2``)."""
        return self.inner.construction.removesuffix("1") + "2" + ("" if self.exact_growth else "_plain")

    def scale_oscillation(self, y, factor):
        return self.inner.scale_oscillation(y, factor)

    def add_rounding_seed(self, y, f):
        return self.inner.add_rounding_seed(y, f)

    def centre(self, y):
        return self.inner.centre(y)

    def predicted_loss(self, y) -> jax.Array:
        return self.inner.predicted_loss(y)

    def slow(self, y):
        return self.inner.slow(y)

    @property
    def models_oscillation(self) -> bool:
        return self.inner.models_oscillation

    def half_norm(self, y) -> jax.Array:
        return self.inner.half_norm(y)

    def predicted_variance(self, y) -> jax.Array:
        inner = getattr(self.inner, "predicted_variance", None)
        return inner(y) if inner is not None else jnp.square(self.inner.half_norm(y))


def second_order(flow: AbstractFlow, *, exact_growth: bool = False, derivative: str = DERIVATIVES[0]) -> SecondOrderFlow:
    """The second-order (backward-error-corrected) version of ``flow``, with the growth along its
    oscillation made exact if ``exact_growth`` (the ``rod2`` construction); ``derivative`` is how
    the correction is evaluated (:meth:`SecondOrderFlow.corrected_field`); see the module."""
    return SecondOrderFlow(flow, exact_growth, derivative)


def second_order_solver(flow: AbstractFlow, dtype):
    """``default_solver`` of the corrected flow: the inner flow's solver with twice its step budget
    per simulated step (the corrected field damps the ``mu ~ -1`` modes at rate ~4 instead of ~2)
    and, for a rod, ``r`` held to its own tolerance (:class:`rodflow_jax._integrate.HalfTolerance`)."""
    from .._integrate import default_solver  # late: _integrate imports flows

    return default_solver(flow if isinstance(flow, SecondOrderFlow) else SecondOrderFlow(flow), dtype)


# measured: the second-order rod works at margins 1.43 (Nesterov 0.5) and 1.5 (GD, RMSProp) and
# breaks at 1.36 (Nesterov 0.9, an unseen tanh net: no catapults, 125k solver steps) and 1.145
# (heavy ball 0.9, mlp-digits: sharpness stuck at 2.5x the threshold)
SECOND_ORDER_MARGIN = 1.4


def second_order_margin(optimizer) -> float | None:
    """Sharpness over threshold at which the rod's flipped r-multiplier reaches ``mu = 2`` on a
    one-dimensional quadratic (where ``q(x) = x - x^2/2`` peaks; past it the corrected rod's
    r-mode grows more slowly, and past ``mu = 3`` it is damped: see the module docstring), from
    the optimizer's own step. GD: 1.5; heavy ball ``(6 + 3 beta)/(4 + 4 beta)``: 1.25 at momentum
    0.5, 1.145 at 0.9. An adaptive optimizer without momentum is GD's map with the preconditioner
    frozen (1.5). ``None`` where the step has no such linear form here (the Adam family's slow
    state is not analysed; ``from_optax``) or the momentum is traced. For a batch, the smallest.
    """
    from ..optimizers import AbstractAdaptiveOptimizer, AbstractMomentumMethod  # noqa: F401

    if not optimizer.analytic_threshold:
        return None
    momentum = isinstance(optimizer, AbstractMomentumMethod)
    if isinstance(optimizer, AbstractAdaptiveOptimizer):
        return None if momentum else 1.5
    if not momentum:
        return _margin(type(optimizer), None)
    beta = optimizer.momentum_decay()
    if isinstance(beta, jax.core.Tracer):
        return None
    return min(_margin(type(optimizer), float(b)) for b in np.unique(to_host(beta)))  # a batch may be sharded


@functools.lru_cache(maxsize=256)
def _margin(cls, beta: float | None) -> float:
    opt = cls(learning_rate=1.0) if beta is None else cls(learning_rate=1.0, momentum=beta)
    phase0, slow = opt.init(jnp.zeros(()))
    has_m = phase0.momentum is not None
    thr = float(opt.threshold(slow))

    def most_negative(ratio):
        lam = ratio * thr

        def step(v):
            ph = Phase(v[0], v[1] if has_m else None)
            g = lam * v[0]
            new = opt.fast_map(ph, g, slow, opt.slow_map(slow, g))
            return jnp.stack([new.params, new.momentum]) if has_m else jnp.stack([new.params])

        jac = jax.jacfwd(step)(jnp.zeros(2 if has_m else 1))
        return float(np.min(np.linalg.eigvals(np.asarray(jac)).real))

    lo, hi = 1.0, 4.0
    if most_negative(hi) > -2.0:
        return hi
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if most_negative(mid) > -2.0 else (lo, mid)
    return 0.5 * (lo + hi)
