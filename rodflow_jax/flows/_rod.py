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
"""

from __future__ import annotations

from math import comb
from typing import ClassVar, NamedTuple, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._tree import tree_add, tree_half_diff, tree_mean2, tree_norm, tree_stack2, tree_sub, tree_unstack2
from ..optimizers import AbstractOptimizer, Phase, Slow
from ._base import AbstractFlow, over_endpoints, slow_scale

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


def period_two_endpoints(window: Sequence):
    """``(c - r, c + r)`` with ``c = (z_K + z_{K+1})/2`` and ``r`` :func:`period_two_half` of
    ``window``: the two states :func:`rod_flow` starts the rod with that centre and half-vector from.
    At order 1 they are the two iterates themselves (bit for bit)."""
    if len(window) == 2:
        return window[0], window[1]
    c, r = tree_mean2(window[0], window[1]), period_two_half(window)
    return tree_sub(c, r), tree_add(c, r)


class RodState(NamedTuple):
    centre: Phase
    half: Phase
    slow: Slow  # scaled by the flow's ``scale``


class RodFlow(AbstractFlow):
    """Rod flow of ``optimizer`` on ``loss_fn``; see the module docstring for the equations."""

    exact_slow_feed: bool = eqx.field(static=True, default=True)
    construction: ClassVar[str] = "rod1"

    @property
    def models_oscillation(self) -> bool:
        return True

    def endpoints(self, y: RodState) -> tuple[Phase, Phase]:
        return tree_add(y.centre, y.half), tree_sub(y.centre, y.half)

    def vector_field(self, t, y: RodState, args) -> RodState:
        opt = self.optimizer
        slow = self.unscaled(y.slow)
        ends = tree_stack2(*self.endpoints(y))
        grads = over_endpoints(lambda z: self.grad(z.params), ends)
        new_slows = jax.vmap(lambda g: opt.slow_map(slow, g))(grads)
        mean_slow = jax.tree.map(lambda x: jnp.mean(x, axis=0), new_slows)
        if self.exact_slow_feed:
            a = opt.slow_alternation()
            new_slows = jax.tree.map(lambda x, m: m + a * (x - m), new_slows, mean_slow)
        moved = jax.vmap(lambda z, g, s1: opt.fast_map(z, g, slow, s1))(ends, grads, new_slows)
        plus, minus = tree_unstack2(moved)
        d_centre = tree_sub(tree_mean2(plus, minus), y.centre)
        d_half = jax.tree.map(lambda a, b, r: -0.5 * (a - b) - r, plus, minus, y.half)
        d_slow = self.scaled(tree_sub(mean_slow, slow))
        return RodState(d_centre, d_half, d_slow)

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
) -> tuple[RodFlow, RodState]:
    """The rod flow and its initial state from two consecutive discrete states.

    ``c = (z0 + z1)/2``, ``r = (z1 - z0)/2`` and ``s = (s0 + s1)/2`` (so the rod's count, and
    hence its bias correction, sits half a step after ``s0``'s).
    """
    slow = tree_mean2(s0, s1)
    flow = RodFlow(optimizer, loss_fn, slow_scale(s1), exact_slow_feed)
    y0 = RodState(tree_mean2(z0, z1), tree_half_diff(z1, z0), flow.scaled(slow))
    return flow, y0
