r"""Adam, NAdam and their scalar-second-moment variants (optax's ``adam`` and ``nadam``)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._errors import check_nonnegative, check_unit_interval
from ._base import (
    AbstractAdaptiveOptimizer,
    AbstractMomentumMethod,
    Phase,
    Slow,
    as_hparam,
    divide,
    safe_sqrt,
    ema,
    second_moment_feed,
    zeros_nu,
)


class _AbstractAdam(AbstractAdaptiveOptimizer, AbstractMomentumMethod):
    r"""The Adam family, with optax's count $t = k + 1$:

    $m' = b_1 m + (1-b_1) g$, $\nu' = b_2 \nu + (1-b_2) f(g)$,
    $w' = w - \eta\, \hat m / (\sqrt{\nu'/(1-b_2^t)} + \epsilon)$, where
    $\hat m = m'/(1-b_1^t)$ (Adam) or
    $\hat m = b_1 m'/(1-b_1^{t+1}) + (1-b_1) g/(1-b_1^t)$ (NAdam, optax's form without Dozat's
    extra $b_2$ factor). ``f(g)`` is ``g**2`` or the scalar $\|g\|^2$.

    The threshold on $\lambda_{\max}(P^{-1}H)$, $P = \sqrt{\hat\nu} + \epsilon$, depends on $t$
    through the first-moment bias correction: for Adam
    $(2 + 2b_1)(1 - b_1^t) / ((1 - b_1)\eta)$, tending to $38/\eta$ at $b_1 = 0.9$.
    """

    scalar: ClassVar[bool]
    nesterov: ClassVar[bool]
    rod_construction: ClassVar[str] = "inertial"

    learning_rate: object = eqx.field(converter=as_hparam)
    b1: jax.Array = eqx.field(converter=as_hparam, default=0.9)
    b2: jax.Array = eqx.field(converter=as_hparam, default=0.999)
    eps: jax.Array = eqx.field(converter=as_hparam, default=1e-8)

    def init_momentum(self, params):
        return jax.tree.map(jnp.zeros_like, params)

    def init_nu(self, params):
        return zeros_nu(params, self.scalar)

    def slow_map(self, slow, grad):
        nu = ema(slow.nu, second_moment_feed(grad, self.scalar), self.b2)
        return Slow(slow.count + 1, nu)

    def preconditioner(self, new_slow):
        bc2 = 1.0 - self.b2**new_slow.count
        return jax.tree.map(lambda v: safe_sqrt(v / bc2) + self.eps, new_slow.nu)

    def _mhat_coefficients(self, t):
        """``(a, c)`` with ``mhat = a m' + c g``."""
        b1 = self.b1
        if self.nesterov:
            return b1 / (1.0 - b1 ** (t + 1)), (1.0 - b1) / (1.0 - b1**t)
        return 1.0 / (1.0 - b1**t), jnp.zeros_like(t)

    def fast_map(self, phase, grad, slow, new_slow):
        eta, t = self.eta(slow), new_slow.count
        m = ema(phase.momentum, grad, self.b1)
        a, c = self._mhat_coefficients(t)
        mhat = jax.tree.map(lambda mi, gi: a * mi + c * gi, m, grad)
        step = divide(mhat, self.preconditioner(new_slow), self.scalar)
        return Phase(jax.tree.map(lambda w, u: w - eta * u, phase.params, step), m)

    def threshold(self, slow):
        # Linearise with P frozen: the phase map on (w, m) has determinant b1 and an eigenvalue
        # -1 when eta * lambda * [a (1 - b1) + c (1 + b1)] = 2 (1 + b1).
        b1, t = self.b1, slow.count + 1
        a, c = self._mhat_coefficients(t)
        return 2.0 * (1.0 + b1) / (self.eta(slow) * (a * (1.0 - b1) + c * (1.0 + b1)))

    def slow_alternation(self):
        return 1.0 / (1.0 + self.b2)

    # --- the velocity form (the inertial flows): b1 is the momentum, P frozen per step ---------
    def momentum_decay(self):
        return self.b1

    def momentum_from_velocity(self, params, velocity, slow, grad_fn):
        r"""``m_k`` from ``v = w_k - w_{k-1} = -\eta (a m_k + c g(w_{k-1})) / P(s_k)``, with
        ``(a, c)`` the bias-correction coefficients at ``s_k.count`` and ``\eta`` that of the step
        from ``s_{k-1}`` (``slow`` is ``s_k``; ``c = 0`` for Adam, so no gradient is needed)."""
        eta = self.eta(Slow(slow.count - 1, slow.nu))
        a, c = self._mhat_coefficients(slow.count)
        p = self.preconditioner(slow)
        scaled = jax.tree.map(lambda v: -v / eta, velocity)
        mhat = (jax.tree.map(lambda v: v * p, scaled) if self.scalar else jax.tree.map(jnp.multiply, scaled, p))
        if self.nesterov:
            g_prev = grad_fn(jax.tree.map(jnp.subtract, params, velocity))
            return jax.tree.map(lambda mh, g: (mh - c * g) / a, mhat, g_prev)
        return jax.tree.map(lambda mh: mh / a, mhat)

    def hyperparameters(self):
        return {"learning_rate": self.learning_rate, "b1": self.b1, "b2": self.b2, "eps": self.eps}

    def __check_init__(self):
        check_unit_interval("b1", self.b1)
        check_unit_interval("b2", self.b2)
        check_nonnegative("eps", self.eps)


class Adam(_AbstractAdam):
    """Adam (``optax.adam``)."""

    name: ClassVar[str] = "adam"
    scalar: ClassVar[bool] = False
    nesterov: ClassVar[bool] = False


class ScalarAdam(_AbstractAdam):
    r"""Adam with one scalar second moment fed by $\|g\|^2$."""

    name: ClassVar[str] = "scalar_adam"
    scalar: ClassVar[bool] = True
    nesterov: ClassVar[bool] = False


class NAdam(_AbstractAdam):
    """NAdam (``optax.nadam``)."""

    name: ClassVar[str] = "nadam"
    scalar: ClassVar[bool] = False
    nesterov: ClassVar[bool] = True


class ScalarNAdam(_AbstractAdam):
    r"""NAdam with one scalar second moment fed by $\|g\|^2$."""

    name: ClassVar[str] = "scalar_nadam"
    scalar: ClassVar[bool] = True
    nesterov: ClassVar[bool] = True
