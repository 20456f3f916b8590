"""A two-parameter toy with progressive sharpening and self-stabilisation.

    L(x, y) = S(y) log cosh(x) - delta x + c/2 (y - y_star)^2,    S(y) = 1 + y^2

Near ``x = 0`` the curvature along ``x`` is ``S(y)``. The last term pulls ``y`` towards
``y_star``, so along gradient flow the sharpness grows from ``S(y0)`` towards
``S(y_star) = 6`` (progressive sharpening). Once ``S > 2/eta`` the ``x`` direction starts a
period-2 oscillation whose amplitude saturates (``log cosh`` softens away from 0, so the
oscillation cannot blow up: ``|dL/dx| <= S + delta``), and it feeds ``S'(y) log cosh(x)`` into
``dL/dy``, pushing ``y`` back down: GD holds the sharpness at ``2/eta`` (self-stabilisation)
while the loss plateaus. The small tilt ``-delta x`` keeps ``x = 0`` from being an invariant
line, so rounding errors seed the oscillation instead of being flushed to zero.

Being deterministic and two-dimensional, GD shows a *delayed* onset: the oscillation grows from
the tiny leftover of the initial transient, so the sharpness first overshoots ``2/eta`` for a
while (to at most ``S(y_star)``) before settling at it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DELTA = 0.1
C = 0.1
Y_STAR = math.sqrt(5.0)


def toy_loss(params, delta=DELTA, c=C, y_star=Y_STAR):
    """``(1 + y^2) log cosh(x) - delta x + c/2 (y - y_star)^2``."""
    x, y = params["x"], params["y"]
    # log cosh(x) = |x| + log1p(exp(-2|x|)) - log 2, stable for large |x|
    ax = jnp.abs(x)
    log_cosh = ax + jnp.log1p(jnp.exp(-2.0 * ax)) - jnp.log(2.0)
    return (1.0 + y**2) * log_cosh - delta * x + 0.5 * c * (y - y_star) ** 2


def make_toy(seed: int = 0, delta: float = DELTA, c: float = C, y_star: float = Y_STAR):
    """``(loss_fn, {"x", "y"})`` with ``x0 = 1 + 0.1 N(0,1)``, ``y0 = 0.5 + 0.05 N(0,1)``."""
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    params0 = {
        "x": 1.0 + 0.1 * jax.random.normal(kx, ()),
        "y": 0.5 + 0.05 * jax.random.normal(ky, ()),
    }

    def loss_fn(params):
        return toy_loss(params, delta, c, y_star)

    return loss_fn, params0
