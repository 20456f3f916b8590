r"""A linear complementarity problem on the cone of PSD matrices, solved inside JAX.

Find a symmetric ``k x k`` matrix ``X`` with

.. math::

    X \succeq 0, \qquad Y = -(b + \mathcal A(X)) \succeq 0, \qquad \langle X, Y\rangle = 0,

with ``A`` and ``b`` given in the coordinates of a Frobenius-orthonormal basis of symmetric
matrices (:func:`sym_basis`). It is what the central flow solves at every evaluation for the
oscillation covariance on its critical directions. Douglas-Rachford splitting (a fixed number
of iterations, each a ``p x p`` solve and a ``k x k`` eigen-projection, ``p = k(k+1)/2``), then
one exact solve on the face it identified, kept only if it satisfies the conditions.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_HI = jax.lax.Precision.HIGHEST


# --- symmetric k x k matrices in a Frobenius-orthonormal basis ----------------------------------
def sym_basis(k: int, dtype) -> jax.Array:
    """``(p, k, k)``, ``p = k(k+1)/2``: ``e_a e_a^T`` and ``(e_a e_b^T + e_b e_a^T)/sqrt 2``."""
    mats = []
    for a in range(k):
        for b in range(a, k):
            e = np.zeros((k, k))
            e[a, b] = e[b, a] = 1.0 if a == b else 2**-0.5
            mats.append(e)
    return jnp.asarray(np.stack(mats), dtype)


def to_vec(E, M):
    return jnp.einsum("qab,ab->q", E, M, precision=_HI)


def to_mat(E, x):
    return jnp.einsum("q,qab->ab", x, E, precision=_HI)


def _eigh(M):
    return jnp.linalg.eigh(0.5 * (M + M.T))


def _psd_part(M):
    w, V = _eigh(M)
    return (V * jnp.maximum(w, 0.0)) @ V.T


class Complementarity(NamedTuple):
    x: jax.Array  # (p,) coordinates of X
    residual: jax.Array  # (p,) coordinates of Y = -(b + A x)


def _restrict(M, support):
    """``M`` on the block ``support x support``; identity elsewhere (so eigenvalues ignore it)."""
    both = support[:, None] & support[None, :]
    return jnp.where(both, M, jnp.where(jnp.eye(M.shape[0], dtype=bool), 1.0, 0.0))


def _face_solve(A, b, E, V, r):
    """Solve ``Y = 0`` on the face ``{V_r Z V_r^T}`` (``V_r``: the last ``r`` columns of ``V``)."""
    k = E.shape[1]
    R = jnp.einsum("rij,ai,bj,qab->rq", E, V, V, E, precision=_HI)  # coordinates in the V basis
    ia, ib = np.triu_indices(k)
    J = jnp.arange(k) >= k - r
    on = J[ia] & J[ib]
    Am = jnp.where(on[:, None] & on[None, :], R @ A @ R.T, jnp.diag(jnp.where(on, 0.0, 1.0)))
    z = jnp.linalg.solve(Am, jnp.where(on, -(R @ b), 0.0))
    return R.T @ jnp.where(on, z, 0.0)


def _newton(A, b, project, x, tau, num_iter: int = 8):
    """Semismooth Newton on the natural map ``x - Pi(x + tau (A x + b))`` from ``x``.

    Quadratic convergence from the splitting's answer, also where ``-A`` is not quite monotone
    (the RMSProps' nu-feed makes it slightly non-symmetric); a non-finite step (the projection's
    derivative at a repeated eigenvalue) is not taken.
    """

    def residual(v):
        return v - project(v + tau * (A @ v + b))

    def body(_, v):
        step = jnp.linalg.solve(jax.jacfwd(residual)(v), residual(v))
        return jnp.where(jnp.all(jnp.isfinite(step)), v - step, v)

    return jax.lax.fori_loop(0, num_iter, body, x)


def _polish(A, b, E, x, support, extra):
    """The best of ``extra`` and exact solves of ``Y = 0`` on the faces of the cone near ``x``.

    With ``V`` the eigenvectors of ``X`` on the support (ascending), the candidate faces are
    ``{V_r Z V_r^T}`` for ``r = 0..k``; a candidate counts if ``X`` is PSD, supported on the
    support, and ``Y`` is PSD there (to rounding). The one with the smallest ``|<X, Y>|`` wins;
    if none counts, ``x`` is kept.
    """
    k = E.shape[1]
    dtype = x.dtype
    eye = jnp.eye(k, dtype=bool)
    both = support[:, None] & support[None, :]
    Xs = jnp.where(both, to_mat(E, x), jnp.where(eye, -1.0, 0.0))  # off-support sorts to the bottom
    V = _eigh(Xs)[1]
    cand = jax.vmap(lambda r: _face_solve(A, b, E, V, r))(jnp.arange(k + 1))
    cand = jnp.concatenate([extra[None], cand])
    tol = 1e3 * jnp.finfo(dtype).eps
    tiny = jnp.finfo(dtype).tiny

    def score(xc):
        X, Y = to_mat(E, xc), to_mat(E, -(b + A @ xc))
        sx = jnp.max(jnp.abs(X)) + tiny
        sy = jnp.max(jnp.abs(b)) + jnp.max(jnp.abs(A @ xc)) + tiny
        ok = jnp.min(_eigh(X)[0]) >= -tol * sx
        ok &= jnp.min(_eigh(_restrict(Y, support))[0]) >= -tol * sy
        ok &= jnp.all(jnp.where(both, 0.0, jnp.abs(X)) <= tol * sx)
        ok &= jnp.all(jnp.isfinite(xc))
        return jnp.where(ok, jnp.abs(jnp.sum(X * Y)) / (sx * sy), jnp.inf)

    scores = jax.vmap(score)(cand)
    best = jnp.argmin(scores)
    xb = jnp.where(both, to_mat(E, cand[best]), 0.0)
    return jnp.where(jnp.isfinite(scores[best]), to_vec(E, xb), x)


def solve_psd_complementarity(A, b, support, num_iter: int = 200) -> Complementarity:
    r"""Solve $X \succeq 0$, $Y = -(B + \mathcal A X) \succeq 0$, $\langle X, Y\rangle = 0$.

    ``A`` (p, p) and ``b`` (p,) act on coordinates in :func:`sym_basis`; ``support`` (k,) bool
    restricts ``X`` (and the condition on ``Y``) to a principal block. Douglas-Rachford on
    ``0 in F(x) + N_K(x)``, ``F(x) = -(A x + b)``, ``K`` the PSD cone on the support
    (converges whenever the symmetric part of ``-A`` is PSD), after a diagonal congruence that
    equilibrates ``A``, then :func:`_polish`. Jittable.
    """
    p = b.shape[0]
    k = support.shape[0]
    E = sym_basis(k, b.dtype)
    # diagonal congruence X = T Xs T (which keeps both cones and <X, Y>) equilibrates the
    # diagonal of A: the RMSProps' nu-feed makes its entries span many orders of magnitude
    ia, ib = np.triu_indices(k)
    diag = jnp.abs(jnp.diagonal(A))[ia == ib]
    t = jnp.where(diag > 0, diag, 1.0) ** -0.25
    s = t[ia] * t[ib]
    A, b = s[:, None] * A * s[None, :], s * b
    mask = (support[:, None] & support[None, :]).astype(b.dtype)
    # step 1/sqrt(mu L) (mu, L: extreme curvatures of F on the support) converges in ~100
    # iterations where the safe 1/L needs thousands on the RMSProps' ill-conditioned systems
    L = jnp.maximum(jnp.linalg.norm(A, 2), jnp.finfo(b.dtype).tiny)
    on = support[ia] & support[ib]
    sym = jnp.where(on[:, None] & on[None, :], -0.5 * (A + A.T), jnp.diag(jnp.full(p, L)))
    mu = jnp.clip(jnp.linalg.eigvalsh(sym)[0], 1e-8 * L, L)
    gamma = 1.0 / jnp.sqrt(mu * L)
    resolvent = jnp.linalg.inv(jnp.eye(p, dtype=b.dtype) - gamma * A)  # (I + gamma F)^-1

    def project(v):
        return to_vec(E, _psd_part(to_mat(E, v) * mask))

    def body(_, w):
        xk = project(w)
        yk = resolvent @ (2 * xk - w + gamma * b)
        return w + yk - xk

    w = jax.lax.fori_loop(0, num_iter, body, jnp.zeros_like(b))
    x = project(w)
    x = _polish(A, b, E, x, support, _newton(A, b, project, x, 1.0 / L))
    return Complementarity(s * x, -(b + A @ x) / s)
