r"""Optimizers as pure maps on a phase state and a slow state.

Every optimizer here is written as a pair of maps (see ``shared/design/rod-flow-math.md``):

.. math::

    s_{k+1} = S(s_k, g(w_k)), \qquad z_{k+1} = T(z_k, g(w_k); s_k, s_{k+1}),

where the *phase state* ``z`` (parameters, and first moment where there is one) is the part
that oscillates at the edge of stability, and the *slow state* ``s`` (step count, second
moment) is smooth. Splitting the step this way is what lets one generic rod-flow construction
serve all nine optimizers: the rod is built from ``T`` and ``S`` alone.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import check_positive
from .._tree import tree_sum_squares

PyTree = Any


class Phase(NamedTuple):
    """Fast phase state ``z``: what oscillates at the edge of stability."""

    params: PyTree
    momentum: PyTree | None = None  # first moment m; None for GD and RMSProp


class Slow(NamedTuple):
    """Slow auxiliary state ``s``: smooth along the trajectory."""

    count: jax.Array  # steps taken so far (optax's count before the update); real-valued in flows
    nu: PyTree | None = None  # second moment: like params, a scalar (scalar variants), or None


def _float_dtype(params):
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params has no array leaves")
    return jnp.result_type(*leaves)


class AbstractOptimizer(eqx.Module):
    """An optimizer as a slow map ``S`` and a fast map ``T``.

    Numeric hyperparameters are array leaves (so they vmap and differentiate); a learning-rate
    schedule ``count -> eta`` may be given instead of a number.
    """

    name: ClassVar[str]
    threshold_quantity: ClassVar[str] = "sharpness"  # what ``threshold`` bounds (a label for outputs)
    # False for an optimizer with no threshold formula (``from_optax``): probes then measure the
    # generic edge ratio of its step map (``rodflow_jax._edge``), which is 1 at the edge
    analytic_threshold: ClassVar[bool] = True
    # the rod construction ``--models rod`` runs (rod1, rod2, inertial, inertial2): chosen per
    # optimizer type by the fidelity grid (README, "Which rod construction runs by default")
    rod_construction: ClassVar[str] = "rod1"

    learning_rate: Any

    # --- the two maps each optimizer supplies ------------------------------------------------
    @abc.abstractmethod
    def init_momentum(self, params) -> PyTree | None: ...

    @abc.abstractmethod
    def init_nu(self, params) -> PyTree | None: ...

    @abc.abstractmethod
    def slow_map(self, slow: Slow, grad) -> Slow:
        """``S``: the new slow state from the old one and the gradient at the phase state."""

    @abc.abstractmethod
    def fast_map(self, phase: Phase, grad, slow: Slow, new_slow: Slow) -> Phase:
        """``T``: the new phase state, given the gradient at ``phase.params`` and both slow states."""

    @abc.abstractmethod
    def threshold(self, slow: Slow) -> jax.Array:
        """The stability threshold of the step taken from slow state ``slow``.

        The quantity it bounds is ``threshold_quantity``: the sharpness lambda_max(H), or the
        preconditioned sharpness lambda_max(P^-1 H) with P from :meth:`preconditioner`.
        """

    @abc.abstractmethod
    def hyperparameters(self) -> dict[str, Any]:
        """All hyperparameters by optax's names."""

    def prepared(self, params) -> "AbstractOptimizer":
        """This optimizer made ready for parameters like ``params`` (what needs a concrete
        template, e.g. a wrapped optax state's decay, is resolved here); itself by default."""
        return self

    def continuous_hyperparameters(self) -> tuple[str, ...]:
        """The hyperparameters that can be swept (vmapped) and differentiated: the numeric ones
        (a schedule cannot)."""
        return tuple(k for k, v in self.hyperparameters().items() if not callable(v))

    def with_hyperparameters(self, **values) -> "AbstractOptimizer":
        """The same optimizer with some hyperparameters replaced (numbers, tracers or batched
        arrays), validated as the constructor validates them."""
        from . import make_optimizer

        return make_optimizer(self.name, **{**self.hyperparameters(), **values})

    def preconditioner(self, new_slow: Slow):
        """The ``P`` the update divides by (a pytree like params, a scalar), or ``None``.

        ``None`` here; :class:`AbstractAdaptiveOptimizer` declares it."""
        return None

    def slow_alternation(self) -> jax.Array:
        """Factor on the alternating part of the slow state's feed for a period-2 orbit (1 here:
        no slow state is fed by the gradient; see :class:`AbstractAdaptiveOptimizer`)."""
        return jnp.ones(())

    # --- generic pieces ------------------------------------------------------------------------
    def eta(self, slow: Slow) -> jax.Array:
        """Learning rate for the step taken from ``slow`` (schedules see optax's count)."""
        if callable(self.learning_rate):
            return self.learning_rate(slow.count)
        return self.learning_rate

    def init(self, params) -> tuple[Phase, Slow]:
        count = jnp.zeros((), _float_dtype(params))
        return Phase(params, self.init_momentum(params)), Slow(count, self.init_nu(params))

    def step(self, phase: Phase, slow: Slow, grad) -> tuple[Phase, Slow]:
        new_slow = self.slow_map(slow, grad)
        return self.fast_map(phase, grad, slow, new_slow), new_slow

    def __check_init__(self):
        if not callable(self.learning_rate):
            check_positive("learning_rate", self.learning_rate)


class AbstractMomentumMethod(AbstractOptimizer):
    """A momentum method with a *velocity form*: what the inertial flows need.

    Its velocity ``w_k - w_{k-1}`` contracts by ``momentum_decay()`` per step, and the momentum
    of a phase state can be rebuilt from the velocity that reached it.
    """

    @abc.abstractmethod
    def momentum_decay(self) -> jax.Array:
        """``beta``: the velocity's contraction per step."""

    @abc.abstractmethod
    def momentum_from_velocity(self, params, velocity, slow: Slow, grad_fn) -> PyTree:
        """The momentum ``m_k`` of the phase state at ``params = w_k`` reached by the step
        ``velocity = w_k - w_{k-1}``, so that ``fast_map`` continues that trajectory."""


class AbstractAdaptiveOptimizer(AbstractOptimizer):
    """An optimizer that divides its update by a preconditioner ``P`` built from a second moment.

    Its threshold bounds the *preconditioned* sharpness ``lambda_max(P^-1 H)``; its stable flow is
    stiff (that sharpness grows without bound along it).
    """

    threshold_quantity: ClassVar[str] = "preconditioned sharpness"

    @abc.abstractmethod
    def preconditioner(self, new_slow: Slow):
        """The ``P`` the update divides by (a pytree like params, or a scalar)."""

    def slow_alternation(self) -> jax.Array:
        """Factor on the alternating part of the slow state's feed for a period-2 orbit.

        For ``s' = b s + (1 - b) f(g)`` fed by a gradient that alternates with period 2, the
        exact alternating part of ``s'`` is ``1 / (1 + b)`` times the naive one.
        """
        return jnp.ones(())


@jax.custom_jvp
def safe_sqrt(x):
    """``sqrt(x)`` whose derivative at ``x = 0`` is taken as 0 (not infinite).

    A second moment is exactly 0 only where every gradient so far was 0 (a dead input pixel, an
    unused embedding row); its tangent is then 0 too, and ``0 * inf`` would make every
    hypergradient and edge probe NaN. The value is unchanged, so steps stay optax's."""
    return jnp.sqrt(x)


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = jnp.sqrt(x)
    return y, jnp.where(x > 0, t / (2 * jnp.where(x > 0, y, 1)), jnp.zeros_like(t))


def as_hparam(x):
    """Numeric hyperparameters become (weakly typed) arrays; schedules stay callables."""
    return x if callable(x) else jnp.asarray(x)


def _float(x):
    if isinstance(x, (bool, str)) or x is None:
        return x  # a switch or a name stays what it is (not 1.0)
    try:
        return float(x)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        return x


def describe(opt: AbstractOptimizer) -> dict[str, Any]:
    """A JSON-friendly description: name and every hyperparameter."""
    hp = {k: ("schedule" if callable(v) else _float(v)) for k, v in opt.hyperparameters().items()}
    return {"name": opt.name, **hp}


# --- second-moment feeds and preconditioned division, shared by the adaptive families -------
def second_moment_feed(grad, scalar: bool):
    """``g^2`` per coordinate, or the scalar ``||g||^2`` (sum over all coordinates)."""
    if scalar:
        return tree_sum_squares(grad)
    return jax.tree.map(jnp.square, grad)


def ema(old, new, decay):
    """``(1 - decay) * new + decay * old`` over matching pytrees (optax's order of operations)."""
    return jax.tree.map(lambda o, n: (1 - decay) * n + decay * o, old, new)


def divide(u, p, scalar: bool):
    """``u / P`` with ``P`` a pytree like ``u`` or (``scalar``) one number."""
    if scalar:
        return jax.tree.map(lambda x: x / p, u)
    return jax.tree.map(jnp.divide, u, p)


def zeros_nu(params, scalar: bool):
    if scalar:
        return jnp.zeros((), _float_dtype(params))
    return jax.tree.map(jnp.zeros_like, params)


ScheduleOrFloat = float | Callable[[jax.Array], jax.Array]
