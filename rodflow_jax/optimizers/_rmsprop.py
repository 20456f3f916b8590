r"""RMSProp and scalar RMSProp (optax's ``rmsprop``: eps inside the root, no bias correction)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import check_nonnegative, check_unit_interval
from ._base import (
    AbstractAdaptiveOptimizer,
    Phase,
    Slow,
    as_hparam,
    divide,
    ema,
    second_moment_feed,
    zeros_nu,
)


class AbstractRMSProp(AbstractAdaptiveOptimizer):
    rod_construction: ClassVar[str] = "rod2"
    r"""$\nu' = d\,\nu + (1-d) f(g)$, $w' = w - \eta\, g / \sqrt{\nu' + \epsilon}$.

    ``f(g)`` is ``g**2`` per coordinate, or the scalar $\|g\|^2$ for the scalar variant.
    Stable while $\lambda_{\max}(P^{-1} H) < 2/\eta$ with $P = \sqrt{\nu' + \epsilon}$.
    """

    scalar: ClassVar[bool]

    learning_rate: object = eqx.field(converter=as_hparam)
    decay: jax.Array = eqx.field(converter=as_hparam, default=0.9)
    eps: jax.Array = eqx.field(converter=as_hparam, default=1e-8)

    def init_momentum(self, params):
        return None

    def init_nu(self, params):
        return zeros_nu(params, self.scalar)

    def slow_map(self, slow, grad):
        nu = ema(slow.nu, second_moment_feed(grad, self.scalar), self.decay)
        return Slow(slow.count + 1, nu)

    def preconditioner(self, new_slow):
        return jax.tree.map(lambda v: jnp.sqrt(v + self.eps), new_slow.nu)

    def fast_map(self, phase, grad, slow, new_slow):
        eta = self.eta(slow)
        step = divide(grad, self.preconditioner(new_slow), self.scalar)
        return Phase(jax.tree.map(lambda w, u: w - eta * u, phase.params, step), None)

    def threshold(self, slow):
        return 2.0 / self.eta(slow)

    def slow_alternation(self):
        return 1.0 / (1.0 + self.decay)

    def hyperparameters(self):
        return {"learning_rate": self.learning_rate, "decay": self.decay, "eps": self.eps}

    def __check_init__(self):
        check_unit_interval("decay", self.decay)
        check_nonnegative("eps", self.eps)


class RMSProp(AbstractRMSProp):
    """RMSProp, per-coordinate second moment (``optax.rmsprop(learning_rate, decay, eps)``)."""

    name: ClassVar[str] = "rmsprop"
    scalar: ClassVar[bool] = False


class ScalarRMSProp(AbstractRMSProp):
    r"""RMSProp with one scalar second moment fed by $\|g\|^2$ (as in Cohen et al. 2025)."""

    name: ClassVar[str] = "scalar_rmsprop"
    scalar: ClassVar[bool] = True
