"""Small problems shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np


def tiny_mlp(seed=0, dtype=jnp.float64, n=40, d=5, h=6, o=3):
    """A two-layer tanh network on random data, as a dict pytree (tuple inside, to test pytrees)."""
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k[0], (n, d), dtype)
    y = jax.random.normal(k[1], (n, o), dtype)
    params = {
        "hidden": (jax.random.normal(k[2], (d, h), dtype) / d**0.5, jnp.zeros(h, dtype)),
        "out": jax.random.normal(k[3], (h, o), dtype) / h**0.5,
    }

    def loss(p):
        w1, b1 = p["hidden"]
        z = jnp.tanh(x @ w1 + b1) @ p["out"]
        return 0.5 * jnp.mean(jnp.sum((z - y) ** 2, axis=-1))

    return loss, params


def lr_for(name):
    return {"gd": 0.3, "heavy_ball": 0.1, "nesterov": 0.1}.get(name, 0.01)


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
