"""What every flow shares: the optimizer, the loss, and a scaled slow state."""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ..optimizers import AbstractOptimizer, Phase, Slow


def _leaf_scale(x):
    """A positive scale for one slow-state leaf, so that absolute tolerances mean something."""
    x = jnp.asarray(x)
    s = jnp.mean(jnp.abs(x)) if x.ndim else jnp.abs(x)
    return jnp.where(s > 0, s, jnp.ones_like(s))


def slow_scale(slow: Slow) -> Slow:
    """Per-leaf scales for ``slow``: 1 for the count, the mean magnitude of each ``nu`` leaf."""
    nu = None if slow.nu is None else jax.tree.map(_leaf_scale, slow.nu)
    return Slow(jnp.ones_like(slow.count), nu)


def check_states(fn: str, phases: dict, slows: dict) -> None:
    """Raise one ``TypeError`` unless each of ``phases`` is a :class:`Phase` and each of ``slows``
    a :class:`Slow` (``run.state_at(k)`` returns such a pair): a dict or a bare pytree in their
    place would otherwise fail deep inside the flow with an attribute error."""
    for want, states in ((Phase, phases), (Slow, slows)):
        for name, value in states.items():
            if not isinstance(value, want):
                raise TypeError(f"{fn}: {name} must be a {want.__name__} (as run_discrete(...).state_at(k) returns), "
                                f"got {type(value).__name__}")


def _apply(slow: Slow, scale: Slow, op) -> Slow:
    return jax.tree.map(op, slow, scale)


def over_endpoints(fn, *stacked):
    """``fn`` applied to each slice of the leading axis of ``stacked`` (a rod's two endpoints),
    results stacked the same way.

    On a CPU one slice after the other (``lax.map``), elsewhere batched (``vmap``); ``ENDPOINTS``
    below overrides that (read when the field is traced). Measured on the 2-core CPU in float64
    (``python benchmarks/endpoints.py``; one field evaluation, batched / in sequence): cnn-digits
    1.5-1.8x faster in sequence for the rod and the inertial rod and 2.4-3.0x for the second-order
    rod (XLA's batched matmuls with these shapes are slower than two plain ones); mlp-digits and
    transformer-sort within 20 % either way (the rod 1.1-1.2x faster in sequence, the second-order
    and inertial rods 1.2-1.35x slower). The CNN cells dominate the grid's time, so a CPU gets the
    sequence. An accelerator fills its lanes with the batch. Under an outer ``vmap`` (a sweep) the
    loop's body is batched over the sweep.
    """
    mode = ENDPOINTS if ENDPOINTS != "auto" else ("map" if jax.default_backend() == "cpu" else "vmap")
    if mode == "map":
        return jax.lax.map(lambda xs: fn(*xs), stacked)
    return jax.vmap(fn)(*stacked)


# how :func:`over_endpoints` evaluates: "auto" (by the backend), "map" or "vmap"
ENDPOINTS = "auto"


class AbstractFlow(eqx.Module):
    r"""An ODE in optimizer-step time whose unit-time map approximates one optimizer step.

    The state is integrated with the slow state divided by ``scale`` (fixed at the start), so
    that one absolute tolerance serves parameters and second moments of any magnitude.
    """

    optimizer: AbstractOptimizer
    loss_fn: Callable = eqx.field(static=True)
    scale: Slow
    # the construction's name as records report it (``"rod1"``, ``"rod2"``, ``"inertial"``, ...)
    construction: ClassVar[str] = "flow"

    @abc.abstractmethod
    def vector_field(self, t, y, args) -> Any:
        """``dy/dt``; ``args`` is unused (the flow carries its own hyperparameters)."""

    @abc.abstractmethod
    def centre(self, y) -> Phase:
        """The phase state this flow predicts as the discrete midpoint."""

    @abc.abstractmethod
    def predicted_loss(self, y) -> jax.Array:
        """The flow's prediction of the time-averaged loss."""

    @abc.abstractmethod
    def slow(self, y) -> Slow:
        """The (unscaled) slow state."""

    @property
    def models_oscillation(self) -> bool:
        """Whether the flow carries the oscillation itself (a rod: ``half_norm`` is its |r|)."""
        return False

    def half_norm(self, y) -> jax.Array:
        """|r| in parameter space, the predicted oscillation amplitude (0 without a rod)."""
        return jnp.zeros(())

    def predicted_variance(self, y) -> jax.Array:
        """The predicted oscillation variance ``E|x - centre|^2`` in parameter space: ``|r|^2``
        for a rod (0 for a flow without one); the central flow's ``tr Sigma``."""
        return jnp.square(self.half_norm(y))

    def add_rounding_seed(self, y, f):
        """``f`` (a field at ``y``) plus the drift by which a rod models the rounding each optimizer
        step adds to its oscillation (:meth:`RodFlow.add_rounding_seed`); ``f`` itself here."""
        return f

    def ode_field(self, t, y, args):
        """What the solver integrates: :meth:`vector_field` with the rounding seed added."""
        return self.add_rounding_seed(y, self.vector_field(t, y, args))

    def scale_oscillation(self, y, factor):
        """``y`` with its oscillation part (a rod's half-vector, and its velocity where it has
        one) multiplied by ``factor``; ``y`` itself for a flow without one. Through
        :meth:`oscillation` the solver holds the half-vector to its own tolerance
        (``SolverConfig.half_atol``, ``rodflow_jax._integrate.HalfTolerance``)."""
        return y

    def oscillation(self, y):
        """``y`` with everything but its oscillation part set to zero (a tree like ``y``)."""
        return jax.tree.map(jnp.subtract, y, self.scale_oscillation(y, 0.0))

    def scaled(self, slow: Slow) -> Slow:
        return _apply(slow, self.scale, jnp.divide)

    def unscaled(self, slow: Slow) -> Slow:
        return _apply(slow, self.scale, jnp.multiply)

    def grad(self, params):
        return jax.grad(self.loss_fn)(params)
