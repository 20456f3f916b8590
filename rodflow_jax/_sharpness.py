r"""Sharpness probes: the top eigenvalues of the Hessian, or of $P^{-1/2} H P^{-1/2}$.

Two paths, chosen by size: a dense Hessian (``jax.hessian`` + ``eigh``) for small models, and
Lanczos with full reorthogonalisation on Hessian-vector products (forward-over-reverse, with
the linearisation of the gradient taken once per point) for anything larger. Both return the
*largest algebraic* eigenvalues, so large negative curvature is never mistaken for sharpness.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ._errors import InputError
from .optimizers import AbstractOptimizer, Slow

DENSE_MAX_PARAMS = 1500  # above this, "auto" uses Lanczos
_HI = jax.lax.Precision.HIGHEST


def _flat_problem(loss_fn, params, preconditioner):
    """The loss as a function of a flat vector, and ``P^-1/2`` as a flat vector (or None)."""
    flat, unravel = ravel_pytree(params)

    def f(x):
        return loss_fn(unravel(x))

    if preconditioner is None:
        return f, flat, None
    p = ravel_pytree(preconditioner)[0]  # a pytree like params, or one scalar
    inv_sqrt = jnp.broadcast_to(1.0 / jnp.sqrt(p), flat.shape)
    return f, flat, inv_sqrt


def hessian_vector_product(loss_fn, params):
    """``v -> H v`` at ``params`` for pytrees ``v`` shaped like ``params``.

    Forward-over-reverse: the gradient is linearised once (``jax.linearize``), so each further
    product costs one JVP of the gradient, about 2-3 gradients.
    """
    _, hvp = jax.linearize(jax.grad(loss_fn), params)
    return hvp


def _dense_hessian(f, x, batch_size: int = 128):
    """The Hessian, built from HVPs ``batch_size`` columns at a time.

    ``jax.hessian`` pushes all n tangents through the model at once, which for a small CNN
    (n = 3,818) asks for ~30 GB; batching the columns bounds memory by ``batch_size``.
    """
    _, hvp = jax.linearize(jax.grad(f), x)
    eye = jnp.eye(x.shape[0], dtype=x.dtype)
    return jax.lax.map(hvp, eye, batch_size=min(batch_size, x.shape[0]))


def _dense_eigh(f, x, inv_sqrt):
    h = _dense_hessian(f, x)
    if inv_sqrt is not None:
        h = inv_sqrt[:, None] * h * inv_sqrt[None, :]
    h = 0.5 * (h + h.T)
    return jnp.linalg.eigh(h)


def lanczos(matvec, v0, num_iter: int):
    """``num_iter`` Lanczos steps with full (twice-applied) reorthogonalisation.

    Returns the Ritz values (ascending) and Ritz vectors (columns) of the tridiagonal matrix.
    Jittable; a breakdown (an invariant subspace found) leaves the remaining rows at zero.
    """
    n = v0.shape[0]
    dtype = v0.dtype
    basis = jnp.zeros((num_iter + 1, n), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    alpha = jnp.zeros(num_iter, dtype)
    beta = jnp.zeros(num_iter, dtype)
    tiny = jnp.finfo(dtype).eps * 10

    def body(j, carry):
        basis, alpha, beta = carry
        v = basis[j]
        w = matvec(v)
        a = jnp.dot(v, w, precision=_HI)
        mask = (jnp.arange(num_iter + 1) <= j).astype(dtype)[:, None]
        for _ in range(2):  # full reorthogonalisation, twice is enough
            w = w - jnp.matmul((basis * mask).T, jnp.matmul(basis * mask, w, precision=_HI), precision=_HI)
        b = jnp.linalg.norm(w)
        ok = b > tiny * jnp.maximum(jnp.abs(a), 1.0)
        basis = basis.at[j + 1].set(jnp.where(ok, w / jnp.where(ok, b, 1.0), 0.0))
        return basis, alpha.at[j].set(a), beta.at[j].set(jnp.where(ok, b, 0.0))

    basis, alpha, beta = jax.lax.fori_loop(0, num_iter, body, (basis, alpha, beta))
    t = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    evals, evecs = jnp.linalg.eigh(t)
    return evals, jnp.matmul(basis[:num_iter].T, evecs, precision=_HI)


def _lanczos_top(f, x, inv_sqrt, num_iter, key, v0):
    _, hvp = jax.linearize(jax.grad(f), x)
    if inv_sqrt is None:
        matvec = hvp
    else:
        def matvec(v):
            return inv_sqrt * hvp(inv_sqrt * v)
    noise = jax.random.normal(key, x.shape, x.dtype)
    if v0 is None:
        v0 = noise
    else:  # warm start: previous eigenvectors, plus a little noise so no direction is missed
        v0 = jnp.sum(jnp.atleast_2d(v0.T).T, axis=1) if v0.ndim == 2 else v0
        v0 = v0 / jnp.linalg.norm(v0) + 1e-3 * noise / jnp.linalg.norm(noise)
    m = min(num_iter, x.shape[0])
    return lanczos(matvec, v0, m)


def _top_flat(loss_fn, params, k, method, preconditioner, num_iter, key, v0):
    f, x, inv_sqrt = _flat_problem(loss_fn, params, preconditioner)
    n = x.shape[0]
    if method == "auto":
        method = "dense" if n <= DENSE_MAX_PARAMS else "lanczos"
    if method == "dense":
        evals, evecs = _dense_eigh(f, x, inv_sqrt)
    elif method == "lanczos":
        key = jax.random.PRNGKey(0) if key is None else key
        evals, evecs = _lanczos_top(f, x, inv_sqrt, num_iter, key, v0)
    else:
        raise InputError(f"unknown sharpness method '{method}'; choose auto, dense or lanczos")
    k = min(k, evals.shape[0])
    return evals[::-1][:k], evecs[:, ::-1][:, :k]


def top_eigenpairs(
    loss_fn, params, k: int = 1, *, method: str = "auto", preconditioner=None, num_iter: int = 40, key=None, v0=None
):
    """Top-``k`` eigenvalues (largest algebraic first) and eigenvectors of the Hessian.

    With ``preconditioner`` P (a pytree like ``params``, or one scalar) the operator is
    $P^{-1/2} H P^{-1/2}$, whose eigenvalues are those of $P^{-1} H$. ``method`` is
    ``"auto"`` (dense up to ``DENSE_MAX_PARAMS`` parameters, else Lanczos), ``"dense"`` or
    ``"lanczos"`` (``num_iter`` Hessian-vector products, optionally warm-started from ``v0``,
    a flat vector or a ``(n, j)`` matrix of previous eigenvectors).

    Returns ``(eigenvalues (k,), eigenvectors)``, the eigenvectors a pytree shaped like
    ``params`` with a leading axis of size ``k`` (unit norm over the whole pytree). Jittable and
    vmappable for a fixed method.
    """
    evals, evecs = _top_flat(loss_fn, params, k, method, preconditioner, num_iter, key, v0)
    unravel = ravel_pytree(params)[1]
    return evals, jax.vmap(unravel)(evecs.T)


def top_eigenvalues(loss_fn, params, k: int = 1, *, method: str = "auto", preconditioner=None, **kw):
    """Top-``k`` eigenvalues (largest algebraic first); see :func:`top_eigenpairs`."""
    return _top_flat(loss_fn, params, k, method, preconditioner, kw.get("num_iter", 40), kw.get("key"), kw.get("v0"))[0]


class SharpnessProbe(NamedTuple):
    eigenvalues: jax.Array  # (k,) top eigenvalues of H or P^-1/2 H P^-1/2
    threshold: jax.Array  # the optimizer's threshold for this step
    vectors: jax.Array  # (n, k) flat eigenvectors, to warm-start the next probe


def optimizer_sharpness(
    optimizer: AbstractOptimizer, loss_fn, params, slow: Slow, k=1, method="auto", *, num_iter=40, v0=None
) -> SharpnessProbe:
    """The quantity ``optimizer``'s threshold is on, at ``(params, slow)``, and the threshold.

    For adaptive optimizers ``P`` is built from the *updated* slow state ``S(s, g(params))``,
    exactly as the step divides by it (bias correction included), so the ratio
    sharpness/threshold is right from the first step.
    """
    p = None
    if optimizer.threshold_quantity != "sharpness":
        g = jax.grad(loss_fn)(params)
        p = optimizer.preconditioner(optimizer.slow_map(slow, g))
    evals, vecs = _top_flat(loss_fn, params, k, method, p, num_iter, None, v0)
    return SharpnessProbe(evals, optimizer.threshold(slow), vecs)
