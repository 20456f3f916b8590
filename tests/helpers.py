"""Small problems shared by the tests: cached, so every test gets the same loss closure and
JAX compiles each kernel once per session."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
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


def assert_records_close(a, b, rtol=1e-9, path=""):
    """Two JSON-like records equal: numbers to ``rtol``, everything else exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(set(a) ^ set(b)))
        for k in a:
            assert_records_close(a[k], b[k], rtol, f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_records_close(x, y, rtol, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        assert np.isclose(a, b, rtol=rtol, atol=0.0), (path, a, b)
    else:
        assert a == b, (path, a, b)


def optax_counterparts():
    """The optax optimizers the built-ins reproduce (the scalar variants have none)."""
    import optax

    return {
        "gd": lambda lr: optax.sgd(lr),
        "heavy_ball": lambda lr: optax.sgd(lr, momentum=0.9),
        "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
        "rmsprop": lambda lr: optax.rmsprop(lr),
        "adam": lambda lr: optax.adam(lr),
        "nadam": lambda lr: optax.nadam(lr),
    }


def optax_params(tx, loss, params, n):
    """Flat parameters ``z_0 .. z_n`` of optax's own jitted loop (``tx.update`` + ``apply_updates``)."""
    import optax

    state = tx.init(params)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    out = [flat(params)]
    for _ in range(n):
        params, state = step(params, state)
        out.append(flat(params))
    return np.array(out)
