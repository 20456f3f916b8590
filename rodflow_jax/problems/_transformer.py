"""A tiny transformer that learns to sort short token sequences.

Task: a fixed data set of ``n`` sequences of ``length`` tokens drawn uniformly from a vocabulary
of ``vocab`` (numpy ``default_rng(0)``, independent of the seed); at every position the model
predicts the token of the *sorted* sequence at that position. The model is one pre-LayerNorm
encoder block (non-causal, two attention heads, a tanh MLP) with learned token and positional
embeddings, d_model 16; the loss is the square loss on one-hot targets (or cross-entropy),
averaged over positions and sequences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _sort_numpy(n: int, length: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(n, length))
    return tokens, np.sort(tokens, axis=1)


def sort_data(n: int = 256, length: int = 6, vocab: int = 8):
    """``(tokens, sorted_tokens)``, both int arrays of shape ``(n, length)``."""
    tokens, targets = _sort_numpy(n, length, vocab)
    return jnp.asarray(tokens), jnp.asarray(targets)


def init_transformer(key, vocab=8, length=6, d_model=16, d_mlp=32, readout_gain=0.25):
    """Normal(0, 1/fan_in) weights, zero biases, unit LayerNorm gains; 2,552 parameters.

    The final LayerNorm gain starts at ``readout_gain`` (0.25): LayerNorm fixes the norm of the
    features the readout sees, so with a unit gain the initial sharpness is the largest of the
    run; a small gain starts the model flat and lets training sharpen it progressively.
    """
    ks = jax.random.split(key, 8)
    d = d_model

    def normal(k, shape, fan_in):
        return jax.random.normal(k, shape) / jnp.sqrt(fan_in)

    return {
        "embed": normal(ks[0], (vocab, d), 1.0) * 0.5,
        "pos": normal(ks[1], (length, d), 1.0) * 0.5,
        "ln1": {"g": jnp.ones((d,)), "b": jnp.zeros((d,))},
        "wqkv": normal(ks[2], (d, 3 * d), d),
        "wo": normal(ks[3], (d, d), d),
        "ln2": {"g": jnp.ones((d,)), "b": jnp.zeros((d,))},
        "w1": normal(ks[4], (d, d_mlp), d),
        "b1": jnp.zeros((d_mlp,)),
        "w2": normal(ks[5], (d_mlp, d), d_mlp),
        "b2": jnp.zeros((d,)),
        "lnf": {"g": readout_gain * jnp.ones((d,)), "b": jnp.zeros((d,))},
        "unembed": normal(ks[6], (d, vocab), d),
        "ub": jnp.zeros((vocab,)),
    }


def _layer_norm(p, x, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["g"] + p["b"]


def _attention(params, x, n_heads):
    n, length, d = x.shape
    q, k, v = jnp.split(x @ params["wqkv"], 3, axis=-1)
    heads = lambda t: t.reshape(n, length, n_heads, d // n_heads)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    scores = jnp.einsum("nqhc,nkhc->nhqk", q, k) / jnp.sqrt(d // n_heads)
    out = jnp.einsum("nhqk,nkhc->nqhc", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(n, length, d) @ params["wo"]


def transformer_apply(params, tokens, n_heads=2):
    """``tokens (n, length)`` -> logits ``(n, length, vocab)``."""
    x = params["embed"][tokens] + params["pos"][None, : tokens.shape[1]]
    x = x + _attention(params, _layer_norm(params["ln1"], x), n_heads)
    h = jnp.tanh(_layer_norm(params["ln2"], x) @ params["w1"] + params["b1"])
    x = x + h @ params["w2"] + params["b2"]
    return _layer_norm(params["lnf"], x) @ params["unembed"] + params["ub"]


def make_transformer_sort(
    seed: int = 0, n: int = 256, length: int = 6, vocab: int = 8, loss: str = "mse"
):
    """Tiny transformer sorting ``n`` fixed sequences.

    ``loss="mse"`` (default): ``1/2 ||outputs - one_hot(target)||^2`` averaged over sequences
    and positions; ``"ce"``: mean cross-entropy. (The task is learnable exactly, so with
    cross-entropy the loss and with it the sharpness collapse within the default step count;
    the square loss keeps the Gauss-Newton curvature and the run stays at the edge.)
    """
    tokens, targets = sort_data(n, length, vocab)
    params0 = init_transformer(jax.random.PRNGKey(seed), vocab=vocab, length=length)
    if loss not in ("mse", "ce"):
        raise ValueError(f"loss must be 'mse' or 'ce', got {loss!r}")

    def loss_fn(params):
        outputs = transformer_apply(params, tokens)
        if loss == "ce":
            logp = jax.nn.log_softmax(outputs, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
        one_hot = jax.nn.one_hot(targets, vocab, dtype=outputs.dtype)
        return 0.5 * jnp.mean(jnp.sum((outputs - one_hot) ** 2, axis=-1))

    return loss_fn, params0
