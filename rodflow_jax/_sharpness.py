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
from ._tree import tree_all_finite, tree_where
from .optimizers import AbstractAdaptiveOptimizer, AbstractOptimizer, Slow

# "auto" uses the dense Hessian up to this size: it costs n HVPs per probe, where a warm-started
# Lanczos probe costs 6-25 (benchmarks/sharpness.py), so dense pays off only for tiny models
DENSE_MAX_PARAMS = 32
_HI = jax.lax.Precision.HIGHEST


def _flat_problem(loss_fn, params, preconditioner):
    """The loss as a function of a flat vector, and ``P^-1/2`` as a flat vector (or None)."""
    flat, unravel = ravel_pytree(params)

    def f(x):
        return loss_fn(unravel(x))

    if preconditioner is None:
        return f, flat, None
    _check_preconditioner(preconditioner, params)
    p = ravel_pytree(preconditioner)[0]  # a pytree like params, or one scalar
    inv_sqrt = jnp.broadcast_to(1.0 / jnp.sqrt(p), flat.shape)
    return f, flat, inv_sqrt


def _check_preconditioner(preconditioner, params) -> None:
    """One scalar, or a pytree with ``params``' structure and shapes; positive where its values
    are concrete. (A dict with one of two keys was broadcast over every parameter, a zero gave NaN.)"""
    leaves = jax.tree.leaves(preconditioner)
    scalar = jax.tree_util.treedef_is_leaf(jax.tree.structure(preconditioner)) and jnp.size(leaves[0]) == 1
    if not scalar:
        same = jax.tree.structure(preconditioner) == jax.tree.structure(params) and all(
            jnp.shape(a) == jnp.shape(b) for a, b in zip(leaves, jax.tree.leaves(params)))
        if not same:
            raise InputError("preconditioner must be one positive scalar or a pytree shaped like params "
                             f"({jax.tree.structure(params)}), got {jax.tree.structure(preconditioner)}")
    concrete = [x for x in leaves if not isinstance(x, jax.core.Tracer)]
    if concrete and not all(bool(jnp.all(jnp.asarray(x) > 0)) for x in concrete):
        raise InputError("preconditioner must be positive everywhere (P^-1/2 is taken)")


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
    if not 1 <= k <= n:
        raise InputError(f"k must lie in 1..{n} (the number of parameters), got {k}")
    if method == "lanczos" or (method == "auto" and n > DENSE_MAX_PARAMS):
        if not k <= min(num_iter, n):
            raise InputError(f"Lanczos with num_iter={num_iter} gives at most {min(num_iter, n)} eigenvalues, asked for {k}")
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
    if isinstance(optimizer, AbstractAdaptiveOptimizer):
        g = jax.grad(loss_fn)(params)
        p = optimizer.preconditioner(optimizer.slow_map(slow, g))
    evals, vecs = _top_flat(loss_fn, params, k, method, p, num_iter, None, v0)
    return SharpnessProbe(evals, optimizer.threshold(slow), vecs)


# --- probes along a trajectory: warm-started Lanczos with a residual stopping rule ------------
def lanczos_adaptive(matvec, v0, max_iter: int, k: int = 1, tol: float = 1e-3, min_iter: int = 6):
    """Lanczos (full reorthogonalisation) that stops once the top-``k`` Ritz pairs converge.

    The residual of Ritz pair ``(theta_i, s_i)`` after ``j`` steps is ``|beta_j s_i[j]|``; the
    loop stops when it is below ``tol * |theta_1|`` for all ``i <= k`` (the eigenvalue error is
    then about ``residual^2 / gap``), after at least ``min_iter`` steps, at a breakdown, or at
    ``max_iter``. Returns ``(eigenvalues (k,), flat eigenvectors (n, k), iterations)``.
    """
    n = v0.shape[0]
    m = min(max_iter, n)
    dtype = v0.dtype
    k = min(k, m)
    lo = min(max(min_iter, k), m)
    tiny = jnp.finfo(dtype).eps * 10
    idx = jnp.arange(m)

    def ritz(alpha, beta, j):
        """Top-k Ritz pairs of the leading (j+1) x (j+1) block (the rest padded below it)."""
        on = idx <= j
        big = 1.0 + 2.0 * (jnp.max(jnp.abs(jnp.where(on, alpha, 0.0))) + jnp.max(jnp.abs(beta)))
        diag = jnp.where(on, alpha, jnp.min(jnp.where(on, alpha, jnp.inf)) - big)
        off = jnp.where(idx[:-1] < j, beta[:-1], 0.0)
        t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
        evals, evecs = jnp.linalg.eigh(t)
        return evals[::-1][:k], evecs[:, ::-1][:, :k]

    def cond(c):
        j, _, _, _, done = c
        return (j < m) & ~done

    def body(c):
        j, basis, alpha, beta, _ = c
        v = basis[j]
        w = matvec(v)
        a = jnp.dot(v, w, precision=_HI)
        mask = (jnp.arange(m + 1) <= j).astype(dtype)[:, None]
        for _ in range(2):
            w = w - jnp.matmul((basis * mask).T, jnp.matmul(basis * mask, w, precision=_HI), precision=_HI)
        b = jnp.linalg.norm(w)
        ok = b > tiny * jnp.maximum(jnp.abs(a), 1.0)
        basis = basis.at[j + 1].set(jnp.where(ok, w / jnp.where(ok, b, 1.0), 0.0))
        alpha, beta = alpha.at[j].set(a), beta.at[j].set(jnp.where(ok, b, 0.0))
        theta, s = ritz(alpha, beta, j)
        res = jnp.abs(beta[j] * s[j])
        converged = jnp.all(res <= tol * jnp.maximum(jnp.abs(theta[0]), tiny))
        return j + 1, basis, alpha, beta, ~ok | ((j + 1 >= lo) & converged)

    basis = jnp.zeros((m + 1, n), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    init = (jnp.zeros((), jnp.int32), basis, jnp.zeros(m, dtype), jnp.zeros(m, dtype), jnp.zeros((), bool))
    j, basis, alpha, beta, _ = jax.lax.while_loop(cond, body, init)
    theta, s = ritz(alpha, beta, j - 1)
    return theta, jnp.matmul(basis[:m].T, s, precision=_HI), j


def _probe_operator(optimizer: AbstractOptimizer, loss_fn, params, slow: Slow):
    """``(f, x, P^-1/2 or None)`` for the quantity the optimizer's threshold is on."""
    p = None
    if isinstance(optimizer, AbstractAdaptiveOptimizer):
        g = jax.grad(loss_fn)(params)
        p = optimizer.preconditioner(optimizer.slow_map(slow, g))
    return _flat_problem(loss_fn, params, p)


class ProbeTrajectory(NamedTuple):
    """Probes along a trajectory (leading axis: the probed states)."""

    eigenvalues: jax.Array  # (m, k) top eigenvalues of H or P^-1/2 H P^-1/2; NaN where not finite
    threshold: jax.Array  # (m,) the optimizer's threshold
    hvps: jax.Array  # (m,) Hessian-vector products each probe took
    vector: jax.Array  # (n,) the last warm start (to continue a chunked trajectory)


def probe_trajectory(optimizer: AbstractOptimizer, loss_fn, params, slow: Slow, v0, *, k: int = 1,
                     method: str = "lanczos", max_iter: int = 40, tol: float = 1e-3) -> ProbeTrajectory:
    """The one probe loop: (preconditioned) sharpness at each of the stacked states ``params``,
    ``slow`` (leading axis m), a ``lax.scan`` that warm-starts each Lanczos probe from the previous
    probe's top eigenvectors (plus a little noise) and stops it by :func:`lanczos_adaptive`'s
    residual rule. ``v0`` is a flat start vector. ``method="dense"`` takes ``eigh`` of the full
    Hessian instead (n HVPs). An optimizer with no threshold formula (``analytic_threshold``
    False) gets its generic edge ratio instead, with threshold 1. A state that is not finite
    gives NaN and keeps the warm start.
    Pure: jit and vmap it.
    """
    if method not in ("lanczos", "dense"):
        raise InputError(f"unknown sharpness method '{method}'; choose auto, dense or lanczos")
    key = jax.random.PRNGKey(1)

    def one(v, state):
        p, s = state
        ok = tree_all_finite(p) & tree_all_finite(s)
        p = tree_where(ok, p, jax.tree.map(jnp.zeros_like, p))
        s = tree_where(ok, s, jax.tree.map(jnp.ones_like, s))
        if not optimizer.analytic_threshold:  # no formula: the step map's own edge ratio
            from ._edge import edge_probe

            phase = optimizer.init(p)[0]  # zero fast state: exact where momenta enter linearly
            e = edge_probe(optimizer, loss_fn, phase, s, num_iter=max_iter, v0=v)
            good = ok & jnp.all(jnp.isfinite(e.vector))
            ev = jnp.where(ok, jnp.reshape(e.ratio, (1,)), jnp.nan)
            return jnp.where(good, e.vector, v), (ev, jnp.where(ok, 1.0, jnp.nan).astype(ev.dtype),
                                                  jnp.asarray(max_iter, jnp.int32))
        f, x, inv_sqrt = _probe_operator(optimizer, loss_fn, p, s)
        if method == "dense":
            evals, evecs = _dense_eigh(f, x, inv_sqrt)
            evals, vecs, its = evals[::-1][:k], evecs[:, ::-1][:, :k], jnp.asarray(x.shape[0], jnp.int32)
        else:
            _, hvp = jax.linearize(jax.grad(f), x)
            matvec = hvp if inv_sqrt is None else (lambda u: inv_sqrt * hvp(inv_sqrt * u))
            noise = jax.random.normal(key, x.shape, x.dtype)
            start = v / jnp.linalg.norm(v) + 1e-2 * noise / jnp.linalg.norm(noise)
            evals, vecs, its = lanczos_adaptive(matvec, start, max_iter, k, tol)
        warm = jnp.sum(vecs, axis=1)
        good = ok & jnp.all(jnp.isfinite(warm)) & (jnp.linalg.norm(warm) > 0)
        thr = optimizer.threshold(s)
        nan = jnp.full_like(evals, jnp.nan)
        return jnp.where(good, warm, v), (jnp.where(ok, evals, nan), jnp.where(ok, thr, jnp.nan), its)

    v, (evals, thr, its) = jax.lax.scan(one, v0, (params, slow))
    return ProbeTrajectory(evals, thr, its, v)
