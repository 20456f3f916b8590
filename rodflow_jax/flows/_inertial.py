r"""The inertial rod flow: a second-order rod flow for the momentum methods.

The first-order rod flow of a momentum method with ``beta = 0.9`` damps the underdamped bulk
directions (discrete multipliers ``sqrt(beta) e^{±i theta}``) at rate ``1 - sqrt(beta) cos
theta`` per step instead of ``-log sqrt(beta) ~ 0.05``, and collapses the rod after each catapult
instead of letting it ring down for ~``2/(1 - beta)`` steps. Here the rod is written in
parameter space with *velocities*, which is exact for a momentum method:

with ``c_k = (w_k + w_{k+1})/2``, ``rho_k = (-1)^k (w_{k+1} - w_k)/2`` and the velocities
``u_c = c_k - c_{k-1}``, ``u_rho = rho_k - rho_{k-1}``, one optimizer step from both endpoints
``c ± rho`` (arriving with the velocities ``V± = u_c ± (2 rho - u_rho)``) gives

.. math::

    u_c' = \tfrac12 (V_+' + V_-'), \qquad u_\rho' = -2\rho - \tfrac12 (V_+' - V_-'),
    \qquad c' = c + u_c', \quad \rho' = \rho + u_\rho',

where ``V' = T(w, m(V)).w - w`` is the optimizer's own step (``m(V)`` from
``optimizer.momentum_from_velocity``). For heavy ball this is heavy-ball descent-ascent on
``F(c, rho) = (L(c+rho) + L(c-rho))/2 - (1+beta)|rho|^2/eta``. The velocity map contracts by
``beta`` per step, so its exact generator is ``log(beta)/(beta - 1)`` times its increment:

.. math::

    \dot c = u_c, \quad \dot\rho = u_\rho, \quad
    \dot u_c = \kappa (u_c' - u_c), \quad \dot u_\rho = \kappa (u_\rho' - u_\rho),
    \qquad \kappa = \frac{-\log\beta}{1-\beta}.

On a quadratic this is ``w'' - log(beta) w' + kappa eta H w = 0`` for the centre: every bulk
mode decays at the discrete rate ``sqrt(beta)`` per step, the slow modes move at
``eta lambda/(1 - beta)`` as the optimizer does, and ``rho`` grows exactly when the sharpness
passes the optimizer's threshold. ``rho = u_rho = 0`` is invariant: the *inertial stable flow*.

**The Adam family** has the same velocity form with ``b1`` as the momentum and the
preconditioner frozen per step: ``w_k - w_{k-1} = -eta (a m_k + c g_{k-1}) / P(s_k)`` (``a, c``
the bias corrections; ``c = 0`` for Adam), so ``m_k`` is rebuilt from the velocity exactly
(``momentum_from_velocity``) and the same code runs it, ``kappa = -log(b1)/(1 - b1)``. The slow
state (``nu``) is fed by the two endpoints' mean, as in the first-order rod.
"""

from __future__ import annotations

import abc
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._errors import InputError
from .._host import to_host
from .._tree import tree_add, tree_mean2, tree_norm, tree_stack2, tree_sub, tree_unstack2, tree_zeros_like
from ..optimizers import AbstractMomentumMethod, AbstractOptimizer, Phase, Slow
from ._base import AbstractFlow, check_states, over_endpoints, slow_scale


class InertialState(NamedTuple):
    centre: object  # params pytree c
    half: object  # params pytree rho (zero for the inertial stable flow)
    centre_velocity: object  # u_c
    half_velocity: object  # u_rho
    slow: Slow  # scaled by the flow's ``scale``


def supports(optimizer: AbstractOptimizer) -> str | None:
    """``None`` if the inertial flows are defined for ``optimizer``, else the reason."""
    if not isinstance(optimizer, AbstractMomentumMethod):
        if optimizer.analytic_threshold:
            return (f"the inertial flows are defined for the momentum methods (heavy_ball, nesterov) and the Adam "
                    f"family (b1 as the momentum), not {optimizer.name}")
        return (f"the inertial flows need a velocity form, which a wrapped optax transformation ({optimizer.name}) "
                "does not declare: its momentum cannot be rebuilt from a velocity without knowing the update rule; "
                "for optax.sgd(momentum=b[, nesterov=True]) use --optimizer heavy_ball or nesterov, which equal it")
    beta = optimizer.momentum_decay()
    if not isinstance(beta, jax.core.Tracer) and not np.all(to_host(beta) > 0):  # a batch (maybe sharded): every one
        return "the inertial flows need momentum > 0 (at 0 the method is GD: use the rod flow)"
    return None


def check_inertial(optimizer: AbstractOptimizer) -> None:
    """Raise :class:`InputError` unless ``optimizer`` has a velocity form with ``0 < beta < 1``."""
    reason = supports(optimizer)
    if reason is not None:
        raise InputError(reason)


class AbstractInertialFlow(AbstractFlow):
    """What the inertial rod flow and its ``rho = 0`` limit share: the velocity generator."""

    def _velocity_step(self, w, v, slow):
        """``(V', new slow)``: one optimizer step from ``w`` arriving with velocity ``v``."""
        opt = self.optimizer
        m = opt.momentum_from_velocity(w, v, slow, self.grad)
        g = self.grad(w)
        new_slow = opt.slow_map(slow, g)
        new = opt.fast_map(Phase(w, m), g, slow, new_slow)
        return tree_sub(new.params, w), new_slow

    @abc.abstractmethod
    def velocity_map(self, y: InertialState):
        """``(u_c', u_rho', s')``: the velocities one optimizer step later and the new slow state."""

    def vector_field(self, t, y: InertialState, args) -> InertialState:
        beta = self.optimizer.momentum_decay()
        kappa = -jnp.log(beta) / (1.0 - beta)
        new_uc, new_ur, new_slow = self.velocity_map(y)
        d_uc = jax.tree.map(lambda n, u: kappa * (n - u), new_uc, y.centre_velocity)
        d_ur = jax.tree.map(lambda n, u: kappa * (n - u), new_ur, y.half_velocity)
        d_slow = self.scaled(tree_sub(new_slow, self.unscaled(y.slow)))
        return InertialState(y.centre_velocity, y.half_velocity, d_uc, d_ur, d_slow)

    def scale_oscillation(self, y: InertialState, factor) -> InertialState:
        f = lambda x: factor * x  # noqa: E731
        return y._replace(half=jax.tree.map(f, y.half), half_velocity=jax.tree.map(f, y.half_velocity))

    def centre(self, y: InertialState) -> Phase:
        """The centre's parameters (its momentum is implied by the velocity; not formed here)."""
        return Phase(y.centre, None)

    def slow(self, y: InertialState) -> Slow:
        return self.unscaled(y.slow)


class InertialRodFlow(AbstractInertialFlow):
    """The inertial rod flow; see the module docstring."""

    construction: ClassVar[str] = "inertial"

    @property
    def models_oscillation(self) -> bool:
        return True

    def velocity_map(self, y: InertialState):
        """The discrete rod map in velocity form (exact for a momentum method)."""
        slow = self.unscaled(y.slow)
        c, rho, uc, ur = y.centre, y.half, y.centre_velocity, y.half_velocity
        spread = jax.tree.map(lambda r, u: 2.0 * r - u, rho, ur)
        ends = tree_stack2(tree_add(c, rho), tree_sub(c, rho))
        vels = tree_stack2(tree_add(uc, spread), tree_sub(uc, spread))
        new_v, new_slows = over_endpoints(lambda w, v: self._velocity_step(w, v, slow), ends, vels)
        plus, minus = tree_unstack2(new_v)
        new_ur = jax.tree.map(lambda r, a, b: -2.0 * r - 0.5 * (a - b), rho, plus, minus)
        new_slow = jax.tree.map(lambda x: jnp.mean(x, axis=0), new_slows)
        return tree_mean2(plus, minus), new_ur, new_slow

    def predicted_loss(self, y: InertialState) -> jax.Array:
        return 0.5 * (self.loss_fn(tree_add(y.centre, y.half)) + self.loss_fn(tree_sub(y.centre, y.half)))

    def half_norm(self, y: InertialState) -> jax.Array:
        """``|rho|``: the predicted oscillation amplitude."""
        return tree_norm(y.half)


class InertialStableFlow(AbstractInertialFlow):
    """The inertial stable flow: the inertial rod flow's invariant ``rho = u_rho = 0`` subspace."""

    construction: ClassVar[str] = "inertial_stable"

    def velocity_map(self, y: InertialState):
        new_uc, new_slow = self._velocity_step(y.centre, y.centre_velocity, self.unscaled(y.slow))
        return new_uc, tree_zeros_like(y.half_velocity), new_slow

    def predicted_loss(self, y: InertialState) -> jax.Array:
        return self.loss_fn(y.centre)


def _three_point(a, b, c):
    """``d/dt`` at the first of three unit-spaced samples, to second order."""
    return jax.tree.map(lambda x, y, z: 0.5 * (-3.0 * x + 4.0 * y - z), a, b, c)


def inertial_flow(
    optimizer: AbstractOptimizer, loss_fn, z0: Phase, s0: Slow, z1: Phase, s1: Slow, *, rod: bool = True
) -> tuple[AbstractInertialFlow, InertialState]:
    """The inertial rod flow (or, ``rod=False``, the inertial stable flow) started from two
    consecutive discrete states ``z_K, z_{K+1}``.

    The optimizer is run two more steps from ``z_{K+1}``; the rods ``(c_j, rho_j)`` of
    ``j = K, K+1, K+2`` give ``c = c_K``, ``rho = rho_K`` and their velocities by a one-sided
    second-order difference. The inertial stable flow starts at the same centre and velocity
    with ``rho = 0`` (so it is exactly the inertial rod flow's ``rho -> 0`` limit); both count
    steps from half a step after ``s0``, as the rod does.

    The rods' period-2 start (``rho_j`` from the iterates' period-2 part of order 8, ``flows/_rod.py``)
    was tried here and dropped: on toy heavy ball and mlp-digits heavy ball and Nesterov at
    momentum 0.9 it made the geometric-mean final error 0.366 -> 0.508, and every first catapult
    was on time with either start (``benchmarks/period_two_start.py --models inertial``, 600 steps).
    """
    check_inertial(optimizer)
    check_states("inertial_flow", {"z0": z0, "z1": z1}, {"s0": s0, "s1": s1})
    grad = jax.grad(loss_fn)
    z2, s2 = optimizer.step(z1, s1, grad(z1.params))
    z3, _ = optimizer.step(z2, s2, grad(z2.params))
    w = [z.params for z in (z0, z1, z2, z3)]
    centres = [tree_mean2(w[j], w[j + 1]) for j in range(3)]
    halves = [jax.tree.map(lambda a, b: sign * 0.5 * (b - a), w[j], w[j + 1]) for j, sign in zip(range(3), (1.0, -1.0, 1.0))]
    uc = _three_point(*centres)
    if rod:
        rho, ur = halves[0], _three_point(*halves)
    else:
        rho, ur = tree_zeros_like(halves[0]), tree_zeros_like(halves[0])
    slow = tree_mean2(s0, s1)
    cls = InertialRodFlow if rod else InertialStableFlow
    flow = cls(optimizer, loss_fn, slow_scale(s1))
    return flow, InertialState(centres[0], rho, uc, ur, flow.scaled(slow))
