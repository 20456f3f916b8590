"""A deep linear network: the simplest model with progressive sharpening.

    f(x) = x W1 W2 W3,    L(W) = 1/(2n) sum_i |f(x_i) - y_i|^2,    y_i = x_i A

with ``x_i`` Gaussian (n = 64, 8 inputs), hidden width 8 and ``A`` a fixed 8 x 4 matrix whose
singular values spread over 0.5..3. From a small initialisation (0.5x LeCun scale) gradient
flow learns ``A``'s singular directions one after another, and the sharpness grows with the
product of the layers' norms, so a large learning rate meets ``2/eta`` on the way. The loss is
a polynomial: the edge of stability here comes from depth alone, with no nonlinearity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

N, D_IN, WIDTH, D_OUT = 64, 8, 8, 4


def _data(seed: int = 1234):
    kx, ku, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (N, D_IN))
    u, _ = jnp.linalg.qr(jax.random.normal(ku, (D_IN, D_OUT)))
    v, _ = jnp.linalg.qr(jax.random.normal(kv, (D_OUT, D_OUT)))
    a = u @ jnp.diag(jnp.linspace(3.0, 0.5, D_OUT)) @ v.T
    return x, x @ a


def make_deep_linear(seed: int = 0, init_scale: float = 0.5):
    """``(loss_fn, [W1, W2, W3])``; the data are fixed, ``seed`` draws the initial weights."""
    x, y = _data()
    sizes = (D_IN, WIDTH, WIDTH, D_OUT)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
    params0 = [
        init_scale * jax.random.normal(k, (m, n)) / jnp.sqrt(m)
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]

    def loss_fn(params):
        out = x
        for w in params:
            out = out @ w
        return 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))

    return loss_fn, params0
