r"""Gradient descent, heavy ball and Nesterov momentum (optax's ``sgd`` conventions)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import check_unit_interval
from ._base import AbstractMomentumMethod, AbstractOptimizer, Phase, Slow, as_hparam


class GD(AbstractOptimizer):
    r"""Gradient descent, $w' = w - \eta\, g(w)$ (``optax.sgd(learning_rate)``).

    Stable while the sharpness $\lambda_{\max}(H) < 2/\eta$.
    """

    name: ClassVar[str] = "gd"
    rod_construction: ClassVar[str] = "rod2"
    learning_rate: object = eqx.field(converter=as_hparam)

    def init_momentum(self, params):
        return None

    def init_nu(self, params):
        return None

    def slow_map(self, slow, grad):
        return Slow(slow.count + 1, None)

    def fast_map(self, phase, grad, slow, new_slow):
        eta = self.eta(slow)
        return Phase(jax.tree.map(lambda w, g: w - eta * g, phase.params, grad), None)

    def threshold(self, slow):
        return 2.0 / self.eta(slow)

    def hyperparameters(self):
        return {"learning_rate": self.learning_rate}


def _trace(m, g, beta):
    """optax's momentum trace, ``m' = beta m + g``."""
    return jax.tree.map(lambda mi, gi: beta * mi + gi, m, g)


class _AbstractMomentum(AbstractMomentumMethod):
    """Shared state and slow map of heavy ball and Nesterov."""

    rod_construction: ClassVar[str] = "rod2"  # where its margin allows (flows._registry), else inertial

    learning_rate: object = eqx.field(converter=as_hparam)
    momentum: jax.Array = eqx.field(converter=as_hparam, default=0.9)

    def init_momentum(self, params):
        return jax.tree.map(jnp.zeros_like, params)

    def init_nu(self, params):
        return None

    def slow_map(self, slow, grad):
        return Slow(slow.count + 1, None)

    def hyperparameters(self):
        return {"learning_rate": self.learning_rate, "momentum": self.momentum}

    def momentum_decay(self):
        return self.momentum

    def __check_init__(self):
        check_unit_interval("momentum", self.momentum)


class HeavyBall(_AbstractMomentum):
    r"""Heavy-ball momentum (``optax.sgd(learning_rate, momentum=beta)``).

    $m' = \beta m + g(w)$, $w' = w - \eta m'$; stable while
    $\lambda_{\max}(H) < (2 + 2\beta)/\eta$.
    """

    name: ClassVar[str] = "heavy_ball"

    def fast_map(self, phase, grad, slow, new_slow):
        eta = self.eta(slow)
        m = _trace(phase.momentum, grad, self.momentum)
        return Phase(jax.tree.map(lambda w, mi: w - eta * mi, phase.params, m), m)

    def threshold(self, slow):
        return (2.0 + 2.0 * self.momentum) / self.eta(slow)

    def momentum_from_velocity(self, params, velocity, slow, grad_fn):
        """``w_k - w_{k-1} = -eta m_k``."""
        eta = self.eta(slow)
        return jax.tree.map(lambda v: -v / eta, velocity)


class Nesterov(_AbstractMomentum):
    r"""Nesterov momentum (``optax.sgd(learning_rate, momentum=beta, nesterov=True)``).

    $m' = \beta m + g(w)$, $w' = w - \eta (g + \beta m')$; stable while
    $\lambda_{\max}(H) < (2 + 2\beta) / (\eta (1 + 2\beta))$.
    """

    name: ClassVar[str] = "nesterov"

    def fast_map(self, phase, grad, slow, new_slow):
        eta, beta = self.eta(slow), self.momentum
        m = _trace(phase.momentum, grad, beta)
        w = jax.tree.map(lambda w, gi, mi: w - eta * (gi + beta * mi), phase.params, grad, m)
        return Phase(w, m)

    def threshold(self, slow):
        b = self.momentum
        return (2.0 + 2.0 * b) / (self.eta(slow) * (1.0 + 2.0 * b))

    def momentum_from_velocity(self, params, velocity, slow, grad_fn):
        """``w_k - w_{k-1} = -eta (g(w_{k-1}) + beta m_k)`` with ``w_{k-1} = w_k - velocity``."""
        eta, beta = self.eta(slow), self.momentum
        g_prev = grad_fn(jax.tree.map(jnp.subtract, params, velocity))
        return jax.tree.map(lambda v, g: -(v / eta + g) / beta, velocity, g_prev)
