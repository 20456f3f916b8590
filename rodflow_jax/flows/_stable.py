r"""The stable flow: the rod collapsed to a point.

.. math::

    \dot z = T(z; s) - z, \qquad \dot s = S(z, s) - s.

For GD it is gradient flow in time units of $\eta$. We integrate this plain generator; Cohen et
al. (2025) scale the slow state's derivative by $1/b_2$, which differs by a relative
$O(1 - b_2)$.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax

from .._tree import tree_sub
from ..optimizers import AbstractOptimizer, Phase, Slow
from ._base import AbstractFlow, check_states, slow_scale


class StableState(NamedTuple):
    phase: Phase
    slow: Slow  # scaled by the flow's ``scale``


class StableFlow(AbstractFlow):
    """Stable flow of ``optimizer`` on ``loss_fn``."""

    construction: ClassVar[str] = "stable"

    def vector_field(self, t, y: StableState, args) -> StableState:
        slow = self.unscaled(y.slow)
        g = self.grad(y.phase.params)
        new_slow = self.optimizer.slow_map(slow, g)
        new_phase = self.optimizer.fast_map(y.phase, g, slow, new_slow)
        return StableState(tree_sub(new_phase, y.phase), self.scaled(tree_sub(new_slow, slow)))

    def centre(self, y: StableState) -> Phase:
        return y.phase

    def slow(self, y: StableState) -> Slow:
        return self.unscaled(y.slow)

    def predicted_loss(self, y: StableState) -> jax.Array:
        return self.loss_fn(y.phase.params)


def stable_flow(
    optimizer: AbstractOptimizer, loss_fn, z0: Phase, s0: Slow, s1: Slow
) -> tuple[StableFlow, StableState]:
    """The stable flow started at the discrete state ``(z0, s0)`` (``s1`` sets the scale)."""
    check_states("stable_flow", {"z0": z0}, {"s0": s0, "s1": s1})
    flow = StableFlow(optimizer, loss_fn, slow_scale(s1))
    return flow, StableState(z0, flow.scaled(s0))
