"""A problem file for ``--problem benchmarks/elu_surface.py:make``: an ELU network 2-24-24-1 (697
parameters) regressing a generated smooth surface, ``sin(2.5 x1) cos(1.5 x2) + 0.3 x1 x2`` on 200
uniform points of ``[-1.5, 1.5]^2``, half mean squared error. The data are fixed (sweeps over seeds
vary only the initial parameters).

It was the unseen-problem check of stop 33, kept because the default rod (``rod2`` for GD) loses
to the first-order rod on it (README, "Which rod runs by default"):

    rodflow compare --problem benchmarks/elu_surface.py:make --optimizer gd --learning-rate 0.25 \
        --steps 600 --float64 --models discrete,stable,rod1,rod2
"""

import jax
import jax.numpy as jnp
import numpy as np

SIZES = (2, 24, 24, 1)


def make(seed: int = 0):
    rng = np.random.default_rng(0)  # the data do not depend on the seed; the initial parameters do
    x = rng.uniform(-1.5, 1.5, (200, 2))
    y = np.sin(2.5 * x[:, 0]) * np.cos(1.5 * x[:, 1]) + 0.3 * x[:, 0] * x[:, 1]
    x, y = jnp.asarray(x), jnp.asarray(y)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(SIZES) - 1)
    params = [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
              for k, a, b in zip(keys, SIZES[:-1], SIZES[1:])]

    def loss(p):
        h = x
        for layer in p[:-1]:
            h = jax.nn.elu(h @ layer["w"] + layer["b"])
        return 0.5 * jnp.mean(((h @ p[-1]["w"] + p[-1]["b"])[:, 0] - y) ** 2)

    return loss, params
