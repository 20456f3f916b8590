r"""The rod flow: two consecutive iterates evolved as one object.

A rod with centre ``c`` and half-vector ``r`` has endpoints ``c + r`` and ``c - r`` in phase
space. One optimizer step applied to both endpoints gives the next rod with its orientation
flipped:

.. math::

    A_\pm = \tfrac12 \big(T(c + r) \pm T(c - r)\big), \qquad (c, r) \mapsto (A_+, -A_-).

The rod flow is the ODE whose unit-time step is that map,

.. math::

    \dot c = A_+ - c, \qquad \dot r = -A_- - r, \qquad
    \dot s = \tfrac12 \big(S(c + r, s) + S(c - r, s)\big) - s,

written once here for every optimizer: an optimizer only supplies ``T`` and ``S``. For GD it is
gradient descent-ascent on $\tfrac12(L(c+r) + L(c-r)) - |r|^2/\eta$ (Regis & Chewi 2026,
arXiv:2602.01480; arXiv:2605.06821 for the other eight optimizers).

The slow state's period-2 feed is exact by default: for ``s' = b s + (1-b) f(g)`` the
alternating part of ``s'`` on a period-2 orbit is ``1/(1+b)`` of the naive endpoint value
(``optimizer.slow_alternation()``), so each endpoint's step divides by
``mean + (own - mean)/(1 + b)``.

*The initial half-vector.* ``r = (z_{K+1} - z_K)/2`` is half the step, drift included: where the
valley curves, the iterates sit off its floor along the sharp direction by a smooth offset that
moves with the drift, and the rod reads the offset's change as oscillation. Near the edge that
component decays slowly (``|mu| ~ 1``) and seeds the instability far above the rounding level
where the optimizer's own oscillation sits, so a rod started shortly before the edge fires its
first catapult early (toy, GD, started 30 steps before the edge: 48 steps early for the
second-order rod, 61 for the first-order one). :func:`period_two_half` takes the iterates'
period-2 part instead, from ``z_K .. z_{K+n}``: the binomial alternating difference
``r = sum_j (-1)^(j+1) C(n, j) z_{K+j} / 2^n``, which is ``(z_{K+1} - z_K)/2`` at ``n = 1``.
A component that moves by ``m`` per step passes with gain ``-((1 - m)/2)^n``: a pure period-2
oscillation (``m = -1``) exactly, a drifting one (``m ~ 1``) not at all, and a polynomial
drift of degree below ``n`` is removed exactly. At ``n = 8`` (:data:`PERIOD_TWO_ORDER`) the
toy's late start gets ``|r| = 7e-13`` instead of ``1e-2`` and fires on the step (second
order; the first-order rod 15 early); toy RMSProp and scalar RMSProp started before the edge move
from 15 and 13 steps early to 9 and 15 late (``benchmarks/period_two_start.py``). The drivers start the rods
(:attr:`~rodflow_jax.flows.FlowKind.period_two_start`) from the rod with the iterates' midpoint
as its centre and this half-vector (:func:`period_two_endpoints`); :func:`rod_flow` itself
takes the two endpoints it is given.

*The seed of the first catapult* (stop 34; ``docs/math.md``, "What seeds the first catapult").
``r = 0`` is invariant, and before the edge the discrete run's period-2 part is held at the level
set by the rounding of each step. :func:`rod_flow` measures that rounding at its start
(:func:`~rodflow_jax.flows._rounding.step_rounding`) and the solver integrates the field plus the
drift that feeds its variance to ``|r|^2`` (:meth:`RodFlow.add_rounding_seed`). That level
(~1e-16 ``|c|``) is below where ``c +- r`` can be told from ``c``, so the field samples a short rod
at length ``sqrt(u) |c|``, in the map's linear regime, and scales the difference back
(:meth:`RodFlow.sampled_half`).
"""

from __future__ import annotations

from math import comb
from typing import Any, ClassVar, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._tree import (
    tree_add, tree_axpy, tree_half_diff, tree_mean2, tree_norm, tree_stack2, tree_sub, tree_sum_squares, tree_unstack2,
)
from ..optimizers import AbstractOptimizer, Phase, Slow
from ._base import AbstractFlow, check_states, over_endpoints, slow_scale
from ._rounding import step_rounding

_SIGNS = (1.0, -1.0)
PERIOD_TWO_ORDER = 8  # iterates z_K .. z_{K+8} give a rod's initial half-vector (see the module)


def period_two_order(steps_left: int) -> int:
    """The order used when ``steps_left`` iterates follow ``z_K`` in the run: at most
    :data:`PERIOD_TWO_ORDER`, at least 1 (the two iterates' half difference)."""
    return max(1, min(PERIOD_TWO_ORDER, int(steps_left)))


def period_two_weights(order: int) -> np.ndarray:
    """``w_j = (-1)^(j+1) C(n, j) / 2^n``, ``j = 0..n``: ``sum_j w_j z_{K+j}`` is the period-2 part
    of the iterates at ``K`` with the rod's sign (``n = 1``: ``(z_{K+1} - z_K)/2``)."""
    if order < 1:
        raise ValueError(f"the order must be at least 1, got {order}")
    return np.array([(-1.0) ** (j + 1) * comb(order, j) for j in range(order + 1)]) / 2.0**order


def period_two_half(window: Sequence):
    """The period-2 part of consecutive iterates ``window = (z_K, ..., z_{K+n})`` (pytrees of one
    structure; ``n = len(window) - 1``), by :func:`period_two_weights`."""
    w = period_two_weights(len(window) - 1)
    return jax.tree.map(lambda *xs: sum(float(wj) * x for wj, x in zip(w, xs)), *window)


PERIOD_TWO_GAIN_LIMIT = 2.0  # |r_n| above this times |r_1|: the iterates are in a transient (see below)


def period_two_trusted(window: Sequence):
    """Whether :func:`period_two_half` of ``window`` is a period-2 part at all: ``|r_n| <=``
    :data:`PERIOD_TWO_GAIN_LIMIT` ``|r_1|`` (``r_1 = (z_{K+1} - z_K)/2``; ``vmap`` it for a batch).
    The filter passes a component that moves by ``m`` per step with gain ``((1 - m)/2)^n``, above
    1 for a *growing* oscillation (``m < -1``): a factor 2 at ``n = 8`` means ``|m| > 1.18``, a
    period-2 part that grows by 18 % a step, not the edge of stability (whose oscillation grows or
    decays by a few %) but a transient, e.g. a run started above the threshold whose first steps
    catapult. There the binomial weights amplify the transient (a softplus network at GD 0.5 from
    step 0: ``|r_8| = 4.47`` against ``|r_1| = 1.11``, a rod whose loss is 254 where the two
    iterates' is 22), and the rod starts from the two iterates instead."""
    if len(window) <= 2:
        return jnp.asarray(True)
    r1, rn = tree_half_diff(window[1], window[0]), period_two_half(window)
    return tree_sum_squares(rn) <= PERIOD_TWO_GAIN_LIMIT**2 * tree_sum_squares(r1)


def period_two_endpoints(window: Sequence):
    """``(c - r, c + r)`` with ``c = (z_K + z_{K+1})/2`` and ``r`` :func:`period_two_half` of
    ``window``: the two states :func:`rod_flow` starts the rod with that centre and half-vector from.
    At order 1 they are the two iterates themselves (bit for bit)."""
    if len(window) == 2:
        return window[0], window[1]
    c, r = tree_mean2(window[0], window[1]), period_two_half(window)
    return tree_sub(c, r), tree_add(c, r)


def sample_floor(dtype) -> float:
    """The shortest half-vector, relative to ``|c|``, at which :class:`RodFlow` samples the map:
    ``sqrt(u)`` (``u`` the unit roundoff; float64 1.1e-8, float32 2.4e-4). Shorter rods are
    sampled at this length and the difference scaled back (:meth:`RodFlow.sampled_half`)."""
    return float(np.sqrt(np.finfo(dtype).eps / 2))


class RodState(NamedTuple):
    centre: Phase
    half: Phase
    slow: Slow  # scaled by the flow's ``scale``


class RodFlow(AbstractFlow):
    """Rod flow of ``optimizer`` on ``loss_fn``; see the module docstring for the equations."""

    exact_slow_feed: bool = eqx.field(static=True, default=True)
    # per-parameter variance of the rounding one optimizer step adds (``step_rounding``), or None
    rounding: Any = None
    construction: ClassVar[str] = "rod1"

    @property
    def models_oscillation(self) -> bool:
        return True

    def endpoints(self, y: RodState) -> tuple[Phase, Phase]:
        return tree_add(y.centre, y.half), tree_sub(y.centre, y.half)

    def sampled_half(self, y: RodState):
        """``(r', a)``: the half-vector at which the field samples the map, ``r' = a r`` with
        ``a = max(1, s / |r|)``, ``s`` = :func:`sample_floor` times ``|c|``.

        A rod shorter than ``s`` is in the map's linear regime (the odd part of ``T(c + r) -
        T(c - r)`` is ``2 DT[r] + O(|r|^3)``), so sampling it at length ``s`` and dividing the
        difference by ``a`` is exact to a relative ``O(s^2)``, while sampling it where it is would
        return rounding: below ``u |c|`` both endpoints round to ``c``. The centre and slow parts
        are then the ones of a rod of length ``s``, off by ``O(s^2) = O(u |c|^2)``."""
        size = tree_norm(y.half)
        floor = sample_floor(size.dtype) * tree_norm(y.centre)
        pos = size > 0
        a = jnp.where(pos, jnp.maximum(1.0, floor / jnp.where(pos, size, 1.0)), 1.0)
        return jax.tree.map(lambda x: a * x, y.half), a

    def vector_field(self, t, y: RodState, args) -> RodState:
        opt = self.optimizer
        slow = self.unscaled(y.slow)
        half, stretch = self.sampled_half(y)
        ends = tree_stack2(tree_add(y.centre, half), tree_sub(y.centre, half))
        grads = over_endpoints(lambda z: self.grad(z.params), ends)
        new_slows = jax.vmap(lambda g: opt.slow_map(slow, g))(grads)
        mean_slow = jax.tree.map(lambda x: jnp.mean(x, axis=0), new_slows)
        if self.exact_slow_feed:
            a = opt.slow_alternation()
            new_slows = jax.tree.map(lambda x, m: m + a * (x - m), new_slows, mean_slow)
        moved = jax.vmap(lambda z, g, s1: opt.fast_map(z, g, slow, s1))(ends, grads, new_slows)
        plus, minus = tree_unstack2(moved)
        d_centre = tree_sub(tree_mean2(plus, minus), y.centre)
        d_half = jax.tree.map(lambda p, m, r: -0.5 * (p - m) / stretch - r, plus, minus, y.half)
        d_slow = self.scaled(tree_sub(mean_slow, slow))
        return RodState(d_centre, d_half, d_slow)

    def add_rounding_seed(self, y: RodState, f: RodState) -> RodState:
        """``f`` plus ``(d^2 / (2 |r|^2)) r``, with ``d^2 = sum_i r_i^2 N_i / |r|^2`` the variance that
        one step's rounding (``N = rounding``, per parameter) adds along ``r``: then
        ``d|r|^2/dt = 2 <r, f_r> + d^2``, the law of a mode's mean square under a noise of variance
        ``d^2`` per step, and a decaying rod settles where the discrete run's oscillation does,
        ``|r|^2 = d^2 / (2 |x|)`` at rate ``x``, instead of decaying to the solver's floor. Odd in
        ``r`` and 0 at ``r = 0``; negligible once ``|r| >> d`` (the edge). Parameters only."""
        if self.rounding is None:
            return f
        r = jax.lax.stop_gradient(y.half.params)  # an exogenous forcing: derivatives pass it by
        rr = tree_sum_squares(r)
        pos = rr > 0
        safe = jnp.where(pos, rr, 1.0)
        along = sum(jnp.sum(jnp.square(x) * n) for x, n in zip(jax.tree.leaves(r), jax.tree.leaves(self.rounding))) / safe
        coef = jnp.where(pos, along / (2.0 * safe), 0.0)
        return f._replace(half=f.half._replace(params=tree_axpy(coef, r, f.half.params)))

    def centre(self, y: RodState) -> Phase:
        return y.centre

    def scale_oscillation(self, y: RodState, factor) -> RodState:
        return y._replace(half=jax.tree.map(lambda x: factor * x, y.half))

    def slow(self, y: RodState) -> Slow:
        return self.unscaled(y.slow)

    def predicted_loss(self, y: RodState) -> jax.Array:
        plus, minus = self.endpoints(y)
        return 0.5 * (self.loss_fn(plus.params) + self.loss_fn(minus.params))

    def half_norm(self, y: RodState) -> jax.Array:
        """``|r|`` in parameter space: the predicted oscillation amplitude."""
        return tree_norm(y.half.params)


def rod_flow(
    optimizer: AbstractOptimizer,
    loss_fn,
    z0: Phase,
    s0: Slow,
    z1: Phase,
    s1: Slow,
    *,
    exact_slow_feed: bool = True,
    rounding_seed: bool = True,
) -> tuple[RodFlow, RodState]:
    """The rod flow and its initial state from two consecutive discrete states.

    ``c = (z0 + z1)/2``, ``r = (z1 - z0)/2`` and ``s = (s0 + s1)/2`` (so the rod's count, and
    hence its bias correction, sits half a step after ``s0``'s). With ``rounding_seed`` (and
    float64 parameters) the rounding of one step from ``(c, s)`` is measured
    (:func:`step_rounding`) and seeds ``r`` (:meth:`RodFlow.add_rounding_seed`); in float32 the
    solver's floor on ``r`` (``atol``) is at that level already. The registry's ``rod1`` runs
    without it: its solver holds ``r`` to ``atol``, far above the seed.
    """
    check_states("rod_flow", {"z0": z0, "z1": z1}, {"s0": s0, "s1": s1})
    slow = tree_mean2(s0, s1)
    centre = tree_mean2(z0, z1)
    # float64 only: in float32 the solver holds r to atol, which is where its rounding seed sits already
    # (rodflow_jax._integrate.half_atol)
    seeded = rounding_seed and all(jnp.dtype(x.dtype) == jnp.float64 for x in jax.tree.leaves(centre.params))
    rounding = step_rounding(optimizer, loss_fn, centre, slow) if seeded else None
    flow = RodFlow(optimizer, loss_fn, slow_scale(s1), exact_slow_feed, rounding)
    y0 = RodState(centre, tree_half_diff(z1, z0), flow.scaled(slow))
    return flow, y0
