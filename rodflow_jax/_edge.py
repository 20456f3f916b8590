r"""A generic, matrix-free edge-of-stability probe for any optimizer's step.

The analytic thresholds (``optimizer.threshold``) are worked out per optimizer. This module finds
the edge of stability of *any* fast map ``T`` (a built-in, or an optax transformation wrapped by
:func:`~rodflow_jax.optimizers._optax.from_optax`) from Jacobian-vector products alone.

**The edge.** Freeze the slow state (both ``s`` and the updated ``s'`` that ``T`` reads: for the
adaptive methods, the preconditioner is held fixed) and linearise one step in the fast state
``z = (w, m)`` at ``z_0``, with the gradient linearised as $g_0 + \sigma H (w - w_0)$ and its
curvature part scaled by $\sigma$:

.. math::

    J(\sigma) = A + \sigma B, \qquad A = \partial_z T, \qquad
    B = \partial_g T \; H \; \Pi_w,

where $\Pi_w$ picks the parameter block of ``z``. At $\sigma = 0$ the gradient is frozen
(``A`` has eigenvalue 1 on ``w`` and the momentum decays on ``m``); the step loses stability by
period doubling at the smallest $\sigma^* > 0$ for which $J(\sigma^*)$ has an eigenvalue $-1$.
The **edge ratio** is $1/\sigma^*$: 1 at the edge, below 1 when stable, above 1 past it. For GD
it is $\eta\lambda_{\max}/2$; for heavy ball $\eta\lambda_{\max}/(2+2\beta)$; for the adaptive
methods $\lambda_{\max}(P^{-1}H)$ over their threshold: the library's
sharpness / threshold in every case.

**The eigenproblem.** $J(\sigma) v = -v \iff (A + I) v = -\sigma B v$, so with $A + I$
invertible, $1/\sigma$ is a real eigenvalue of $M = -(A + I)^{-1} B$ and the edge ratio is the
largest real eigenvalue of $M$. ``B`` is zero outside the parameter columns, so the nonzero
eigenvalues of $M$ are those of the $n \times n$ operator (``n`` = number of parameters)

.. math::

    K = G H, \qquad G u = -\Pi_w (A + I)^{-1} \partial_g T\, u,

an "effective preconditioner" $G$ times the Hessian ($G = \eta/2$ for GD,
$\eta/(2+2\beta)$ for heavy ball, a positive diagonal over $P$ for the adaptive methods).
Applying $K$ costs one Hessian-vector product and one solve with $A + I$. The solve is GMRES on
JVPs of ``T`` (with the gradient as an input, these cost no gradients). $A + I$ is well
conditioned (eigenvalues about $2$ and $1 + \beta$). For every built-in, and for the usual optax
transformations (parameters moved by the update, one momentum with one decay, weight decay),
``A`` is block triangular with diagonal blocks $c I$ and $\beta I$, so its minimal polynomial
has degree 2 and GMRES is exact after two steps; ``solve_iter`` beyond that guards other maps.
The top real eigenvalue of $K$ comes from Arnoldi with full reorthogonalisation (``K`` need not
be symmetric: it is self-adjoint only in the $G^{-1}$ inner product, which a generic probe does
not know) and the eigenvalues of the small Hessenberg matrix; the Ritz value with the largest
real part among the real ones is returned.

A ratio $\le 0$ means no positive scaling of the curvature reaches $-1$ (e.g. a concave
direction only). Instabilities by a complex pair leaving the unit circle (not period doubling)
are not what this probes. Sign-based updates (Lion) have zero derivative in ``g`` almost
everywhere, so their ratio is 0: their oscillation is not a linear instability.

**Zero second moments.** A wrapped optax Adam divides by ``sqrt(nu')``, and where ``nu'`` is
exactly 0 (a coordinate whose gradient was always 0: a dead input pixel) JAX's derivative of
``sqrt`` is infinite and the tangent 0, so the JVP is ``0 * inf = NaN`` there. The true
derivative with ``nu'`` frozen is finite (the coordinate's Hessian row is 0), so NaN entries of
the step's tangents are read as 0; a non-finite *state* still gives a NaN ratio. (The
built-ins use :func:`~rodflow_jax.optimizers._base.safe_sqrt` instead.)

``include_slow_feedback=True`` linearises the whole step ``optimizer.step`` instead, letting the
current gradient move ``s'`` (the preconditioner) too: the Jacobian of the actual discrete map's
fast block. The feedback is stabilising (a larger gradient raises ``P``) and of relative size
``O((1 - b_2) g^2 / nu')``, i.e. about ``1/t`` while ``nu`` is young: measured on a small tanh
network 31 steps in, it lowers the ratio by 0.1 % (NAdam) to 2.8 % (scalar Adam).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .optimizers._base import AbstractOptimizer, Phase, Slow

_HI = jax.lax.Precision.HIGHEST


class EdgeProbe(NamedTuple):
    ratio: jax.Array  # 1/sigma*: 1 at the edge of stability, < 1 below it
    vector: jax.Array  # (n,) flat unit vector: the parameter direction that goes unstable
    residual: jax.Array  # Arnoldi residual of that pair, relative to |ratio|


def arnoldi(matvec, v0, num_iter: int):
    """``num_iter`` Arnoldi steps with full (twice-applied) reorthogonalisation.

    Returns the basis ``V`` (``num_iter + 1`` rows) and the ``(num_iter + 1, num_iter)``
    Hessenberg matrix ``H`` with ``matvec(V[:m].T) = V.T H``. A breakdown (an invariant subspace
    found) leaves the remaining rows and columns at zero. Jittable and vmappable.
    """
    n, m, dtype = v0.shape[0], num_iter, v0.dtype
    tiny = jnp.finfo(dtype).eps * 10
    norm0 = jnp.linalg.norm(v0)
    basis = jnp.zeros((m + 1, n), dtype).at[0].set(v0 / jnp.where(norm0 > 0, norm0, 1.0))
    hess = jnp.zeros((m + 1, m), dtype)

    def body(j, carry):
        basis, hess = carry
        w = matvec(basis[j])
        scale = jnp.linalg.norm(w)
        mask = (jnp.arange(m + 1) <= j).astype(dtype)[:, None]
        h = jnp.zeros(m + 1, dtype)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            c = jnp.matmul(basis * mask, w, precision=_HI)
            w = w - jnp.matmul((basis * mask).T, c, precision=_HI)
            h = h + c
        b = jnp.linalg.norm(w)
        ok = b > tiny * scale
        basis = basis.at[j + 1].set(jnp.where(ok, w / jnp.where(ok, b, 1.0), 0.0))
        return basis, hess.at[:, j].set(h.at[j + 1].set(jnp.where(ok, b, 0.0)))

    return jax.lax.fori_loop(0, m, body, (basis, hess))


def gmres(matvec, b, num_iter: int):
    """``x`` minimising ``|matvec(x) - b|`` over the ``num_iter``-dimensional Krylov space (from
    ``x0 = 0``, no restarts): exact once the space holds the solution. Jittable, vmappable."""
    basis, hess = arnoldi(matvec, b, num_iter)
    rhs = jnp.zeros(num_iter + 1, b.dtype).at[0].set(jnp.linalg.norm(b))
    y = jnp.linalg.lstsq(hess, rhs)[0]
    return jnp.matmul(basis[:num_iter].T, y, precision=_HI)


def top_real_ritz(basis, hess):
    """``(theta, unit vector, residual)``: the real Ritz pair with the largest eigenvalue.

    Real means ``|Im theta| <= 1e-8 max|theta|``. The residual is Arnoldi's
    ``|h_{m+1,m} y_m| / |theta|`` for the unit Ritz vector ``y`` (0 after a breakdown: the
    Krylov space was invariant). The value is NaN if no Ritz value is real.
    """
    m = hess.shape[1]
    theta, y = jnp.linalg.eig(hess[:m, :m])
    real = jnp.abs(theta.imag) <= 1e-8 * jnp.max(jnp.abs(theta)) + jnp.finfo(hess.dtype).tiny
    i = jnp.argmax(jnp.where(real, theta.real, -jnp.inf))
    yi = y[:, i]
    yi = yi * jnp.exp(-1j * jnp.angle(yi[jnp.argmax(jnp.abs(yi))]))  # a real eigenvector's phase
    yi = yi.real / jnp.linalg.norm(yi.real)
    value = jnp.where(real[i], theta.real[i], jnp.nan)
    vec = jnp.matmul(basis[:m].T, yi, precision=_HI)
    residual = jnp.abs(hess[m, m - 1] * yi[m - 1]) / jnp.maximum(jnp.abs(value), jnp.finfo(hess.dtype).tiny)
    return value, vec / jnp.linalg.norm(vec), residual


def edge_operator(optimizer: AbstractOptimizer, loss_fn, phase: Phase, slow: Slow, *, solve_iter: int = 8,
                  include_slow_feedback: bool = False):
    """``(u -> K u, x)``: the edge operator $K = G H$ on flat parameter vectors at ``(phase, slow)``
    (module docstring), and the flat parameters ``x``."""
    x, unravel_w = ravel_pytree(phase.params)
    g0, hvp = jax.linearize(jax.grad(loss_fn), phase.params)
    if include_slow_feedback:
        def step(z, g):
            return optimizer.step(z, slow, g)[0]
    else:
        new_slow = optimizer.slow_map(slow, g0)

        def step(z, g):
            return optimizer.fast_map(z, g, slow, new_slow)
    _, t_lin = jax.linearize(step, phase, g0)
    z_flat, unravel_z = ravel_pytree(phase)
    zero_z = jax.tree.map(jnp.zeros_like, phase)
    zero_g = jax.tree.map(jnp.zeros_like, g0)

    def tangent(z, g):  # see "Zero second moments" in the module docstring
        return jnp.nan_to_num(ravel_pytree(t_lin(z, g))[0], nan=0.0, posinf=jnp.inf, neginf=-jnp.inf)

    def a_plus_i(v):  # (A + I) v, gradient held fixed
        return tangent(unravel_z(v), zero_g) + v

    m = min(solve_iter, z_flat.shape[0])

    def k_matvec(u):
        c = tangent(zero_z, hvp(unravel_w(u)))  # dT/dg . H u
        sol = gmres(a_plus_i, c, m)
        return -ravel_pytree(unravel_z(sol).params)[0]

    return k_matvec, x


def edge_probe(
    optimizer: AbstractOptimizer,
    loss_fn,
    phase: Phase,
    slow: Slow,
    *,
    num_iter: int = 40,
    solve_iter: int = 8,
    v0=None,
    key=None,
    include_slow_feedback: bool = False,
) -> EdgeProbe:
    r"""The edge ratio $1/\sigma^*$ of ``optimizer``'s step at ``(phase, slow)``, matrix-free.

    **Arguments:** ``num_iter`` Arnoldi steps (each one Hessian-vector product and a
    ``solve_iter``-step GMRES solve with $A + I$ on JVPs of ``fast_map``); ``v0`` a flat
    warm start (e.g. the previous probe's ``vector``; a little noise is added), else a normal
    vector from ``key``; ``include_slow_feedback`` to linearise ``step`` (the current gradient
    feeding ``s'``) instead of ``fast_map`` with ``s'`` frozen.

    **Returns:** :class:`EdgeProbe` ``(ratio, vector, residual)``. For a built-in it equals
    ``optimizer_sharpness(...).eigenvalues[0] / threshold``. Pure: jit it (``loss_fn`` static,
    e.g. ``eqx.filter_jit``) and vmap it over states or optimizers.
    """
    k_matvec, x = edge_operator(optimizer, loss_fn, phase, slow, solve_iter=solve_iter,
                                include_slow_feedback=include_slow_feedback)
    key = jax.random.PRNGKey(0) if key is None else key
    noise = jax.random.normal(key, x.shape, x.dtype)
    if v0 is None:
        start = noise
    else:
        start = v0 / jnp.linalg.norm(v0) + 1e-3 * noise / jnp.linalg.norm(noise)
    basis, hess = arnoldi(k_matvec, start, min(num_iter, x.shape[0]))
    ratio, vector, residual = top_real_ritz(basis, hess)
    finite = jnp.all(jnp.isfinite(ravel_pytree((phase, slow))[0]))  # tangents are cleaned: not the state
    return EdgeProbe(jnp.where(finite, ratio, jnp.nan), vector, residual)
