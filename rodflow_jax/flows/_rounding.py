r"""The rounding of one optimizer step, measured: what seeds the discrete run's first catapult.

Before the edge of stability the iterates' period-2 part decays (its multiplier ``|mu| < 1``)
until what is left is the rounding each step adds. When the sharpness crosses the threshold,
the first catapult grows from that level: on four built-in cells a relative noise of ``1e-15``
added to the parameters after every step moves it by 1-7 steps earlier, and each further decade
by 3-7 steps (``benchmarks/rounding_seed.py``). The rod's ``r = 0`` is invariant (its field is
odd in ``r``), so without a model of that rounding nothing in the flow seeds its catapult but the
solver's error on ``r``.

:func:`step_rounding` measures it, per parameter, at one state: with ``xi`` a small random
perturbation, ``(T(w + xi) - T(w - xi))/2 - DT[xi]`` is the rounding of the two evaluations
(the map's own terms cancel to ``O(|xi|^3)``), whose variance is half that of one step's
rounding. It is not ``u |w|``: along the top Hessian direction the toy's steps round 45-113x
more than their parameters (the sharp coordinate sits near 0 while the loss is evaluated at
``O(1)``), mlp-digits' 0.8x, deep-linear's 2x. The rod flows add the variance it implies as a
drift along ``r`` (:meth:`RodFlow.add_rounding_seed`, ``docs/math.md``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..optimizers import AbstractOptimizer, Phase, Slow

PROBES = 4  # random perturbations averaged per measurement


def step_rounding(optimizer: AbstractOptimizer, loss_fn, phase: Phase, slow: Slow, *, probes: int = PROBES):
    """Per-parameter variance of the rounding one optimizer step from ``(phase, slow)`` adds to
    the parameters (a tree like ``phase.params``), from ``probes`` antithetic perturbations.

    Pure and vmappable (a fixed key, so every configuration of a batch draws the same
    perturbations); its result is a model constant, so no gradient flows through it.
    """
    phase, slow = jax.lax.stop_gradient((phase, slow))

    def step(params):
        return optimizer.step(Phase(params, phase.momentum), slow, jax.grad(loss_fn)(params))[0].params

    leaves, tree = jax.tree.flatten(phase.params)
    # perturbations of relative size sqrt(u): far above rounding (u), and their cubic remainder
    # (sqrt(u)^3) far below it
    size = float(np.sqrt(np.finfo(leaves[0].dtype).eps / 2))
    mean_size = sum(jnp.sum(jnp.abs(x)) for x in leaves) / max(1, sum(x.size for x in leaves))

    def one(i):  # twice the square of the two evaluations' rounding, halved by the antithetic pair
        keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), i), len(leaves))
        xi = jax.tree.unflatten(tree, [size * (jnp.abs(x) + mean_size) * jax.random.normal(k, x.shape, x.dtype)
                                       for x, k in zip(leaves, keys)])
        linear = jax.jvp(step, (phase.params,), (xi,))[1]
        plus = step(jax.tree.map(jnp.add, phase.params, xi))
        minus = step(jax.tree.map(jnp.subtract, phase.params, xi))
        return jax.tree.map(lambda a, b, d: 2.0 * jnp.square(0.5 * (a - b) - d), plus, minus, linear)

    # one traced probe, mapped (not unrolled: the rods' start is compiled with every solve)
    total = jax.tree.map(lambda x: jnp.mean(x, axis=0), jax.lax.map(one, jnp.arange(probes)))
    return jax.lax.stop_gradient(total)
