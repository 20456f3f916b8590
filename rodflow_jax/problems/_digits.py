"""An MLP and a small CNN on scikit-learn's bundled 8x8 digits (no download).

The data set is the first ``n`` of the 1,797 images (classes are balanced to within a few
examples), pixels scaled to ``[0, 1]`` and one-hot targets. Arrays are created with JAX's default
float dtype, so the problems run in float32 or, with ``jax_enable_x64``, float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

N_CLASSES = 10


@functools.lru_cache(maxsize=None)
def _digits_numpy() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float64 ``(X in [0, 1] of shape (1797, 64), labels)``, loaded once."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.asarray(data.data, dtype=np.float64) / 16.0, np.asarray(data.target, dtype=np.int64)


@functools.lru_cache(maxsize=None)
def _noisy_labels(n: int, label_noise: float) -> np.ndarray:
    """The first ``n`` labels, a fixed ``label_noise`` fraction redrawn uniformly (seed 0)."""
    labels = _digits_numpy()[1][:n].copy()
    rng = np.random.default_rng(0)
    flip = rng.random(n) < label_noise
    labels[flip] = rng.integers(0, N_CLASSES, int(flip.sum()))
    return labels


def digits_data(n: int = 500, label_noise: float = 0.0):
    """The first ``n`` digits as JAX arrays ``(X (n, 64), Y one-hot (n, 10), labels (n,))``.

    ``label_noise`` redraws that fraction of the labels uniformly at random, always the same way.
    """
    x, labels = _digits_numpy()
    if not 1 <= n <= len(x):
        raise ValueError(f"n must lie in [1, {len(x)}], got {n}")
    if label_noise:
        labels = _noisy_labels(n, float(label_noise))
    x, labels = jnp.asarray(x[:n]), jnp.asarray(labels[:n])
    return x, jax.nn.one_hot(labels, N_CLASSES, dtype=x.dtype), labels


def mse_loss(outputs, targets):
    """``1/(2n) sum_n ||outputs_n - targets_n||^2``."""
    return 0.5 * jnp.mean(jnp.sum((outputs - targets) ** 2, axis=-1))


def cross_entropy_loss(logits, targets):
    """Mean softmax cross-entropy against one-hot ``targets``."""
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def _lecun_normal(key, shape, fan_in, scale=1.0):
    """``scale * N(0, 1/fan_in)``."""
    return scale * jax.random.normal(key, shape) / jnp.sqrt(fan_in)


# ---------------------------------------------------------------------------------------------
# MLP 64 -> 32 -> 10, tanh.


MLP_INIT_SCALE = 0.3


def init_mlp(key, sizes=(64, 32, 10), scale=MLP_INIT_SCALE):
    """``scale`` x LeCun-normal weights and zero biases, as ``{"w0", "b0", "w1", "b1", ...}``.

    The small scale (0.3) starts the network flat, so that training shows progressive
    sharpening; with the plain LeCun scale the non-centred ``[0, 1]`` inputs make the initial
    sharpness (about 23) the largest of the run.
    """
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, fan_in, fan_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        params[f"w{i}"] = _lecun_normal(k, (fan_in, fan_out), fan_in, scale)
        params[f"b{i}"] = jnp.zeros((fan_out,))
    return params


def mlp_apply(params, x):
    """tanh on every layer but the last, which is linear."""
    n_layers = len(params) // 2
    for i in range(n_layers):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n_layers - 1:
            x = jnp.tanh(x)
    return x


def make_mlp_digits(seed: int = 0, n: int = 500, loss: str = "mse", label_noise: float = 0.0):
    """MLP 64-32-10 (tanh, 2,410 parameters) on ``n`` digits with MSE or cross-entropy loss."""
    x, y, _ = digits_data(n, label_noise)
    criterion = {"mse": mse_loss, "ce": cross_entropy_loss}[loss]
    params0 = init_mlp(jax.random.PRNGKey(seed))

    def loss_fn(params):
        return criterion(mlp_apply(params, x), y)

    return loss_fn, params0


# ---------------------------------------------------------------------------------------------
# CNN: conv3x3(8) tanh -> 2x2 average pool -> conv3x3(16) tanh -> dense 10.

CNN_INIT_SCALE = 0.3


def init_cnn(key, channels=(1, 8, 16), n_out=N_CLASSES, image=8, scale=CNN_INIT_SCALE):
    """``scale`` x LeCun-normal weights, zero biases; 3,818 parameters with the defaults.

    The small scale plays the same role as in :func:`init_mlp`.
    """
    k0, k1, k2 = jax.random.split(key, 3)
    c0, c1, c2 = channels
    flat = (image // 2) ** 2 * c2
    return {
        "conv0": _lecun_normal(k0, (3, 3, c0, c1), 9 * c0, scale),
        "cb0": jnp.zeros((c1,)),
        "conv1": _lecun_normal(k1, (3, 3, c1, c2), 9 * c1, scale),
        "cb1": jnp.zeros((c2,)),
        "dense": _lecun_normal(k2, (flat, n_out), flat, scale),
        "db": jnp.zeros((n_out,)),
    }


def _conv(x, w, b):
    """3x3 "SAME" convolution (NHWC input, HWIO weights) as one matmul over 3x3 patches.

    The same numbers as ``lax.conv_general_dilated`` (to rounding; tested), and faster on a
    CPU: on this problem in float64 (``python benchmarks/cnn_conv.py``, 2-core CPU), 1.5-1.8x per
    gradient, 1.9-2.0x per Hessian-vector product, 3.9x per rod-field and 4.1x per second-order
    rod-field evaluation (the endpoints in sequence, as a CPU evaluates them).
    """
    height, width, c_in = x.shape[-3:]
    kh, kw = w.shape[:2]
    ph, pw = kh // 2, kw // 2
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    patches = jnp.concatenate(
        [xp[:, i:i + height, j:j + width, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    return patches @ w.reshape(kh * kw * c_in, -1) + b


def _avg_pool2(h):
    n, height, width, c = h.shape
    return h.reshape(n, height // 2, 2, width // 2, 2, c).mean(axis=(2, 4))


def cnn_apply(params, images, conv=_conv):
    """``images`` of shape ``(n, 8, 8, 1)`` -> outputs ``(n, 10)``; ``conv(x, w, b)`` is the
    convolution (``benchmarks/cnn_conv.py`` passes the library one to compare)."""
    h = _avg_pool2(jnp.tanh(conv(images, params["conv0"], params["cb0"])))
    h = jnp.tanh(conv(h, params["conv1"], params["cb1"]))
    return h.reshape(h.shape[0], -1) @ params["dense"] + params["db"]


def make_cnn_digits(seed: int = 0, n: int = 500):
    """Small CNN (3,818 parameters) on ``n`` digits as 8x8 images, MSE loss."""
    x, y, _ = digits_data(n)
    images = x.reshape(-1, 8, 8, 1)
    params0 = init_cnn(jax.random.PRNGKey(seed))

    def loss_fn(params):
        return mse_loss(cnn_apply(params, images), y)

    return loss_fn, params0
