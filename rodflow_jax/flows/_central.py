r"""The central flow (Cohen et al. 2025) for GD, scalar RMSProp and RMSProp.

The central flow models the *time-averaged* iterate at the edge of stability. With
$P^{-1} = D^2$ the preconditioner the step divides by ($D = 1$ for GD, $D = P^{-1/2}$ with
$P = \sqrt{S(\nu, g) + \epsilon}$ for the RMSProps) and the oscillation covariance
$\Sigma = W X W^\top$ supported on the critical directions $W = D U$ ($U$: top-$k$ Ritz
vectors of the preconditioned Hessian $D H D$, whose eigenvalues are those of $P^{-1} H$),

.. math::

    \dot w = -\eta P^{-1}\big[g + \tfrac12 \nabla_w \langle H(w), \Sigma\rangle\big],
    \qquad \langle H, \Sigma\rangle = \operatorname{tr}(X M), \quad
    M_{ab}(w, \nu) = u_a^\top D H(w) D u_b,

    \dot\nu = (1 - \beta_2)\big(f(g) + \Delta f(\Sigma) - \nu\big), \qquad
    \Delta f = \operatorname{diag}(H \Sigma H) \ \ \text{(RMSProp)}, \quad
    \operatorname{tr}(H \Sigma H) \ \ \text{(scalar RMSProp)},

since the oscillating gradient $g(\bar w + x) \approx g + H x$ with $E[x x^\top] = \Sigma$
feeds $E[g^2] = g^2 + \operatorname{diag}(H\Sigma H)$ into the second moment. Time is in
optimizer steps and the slow state uses the *plain generator* $S(s) - s$, as the stable flow
does (Cohen et al. scale $\dot\nu$ by $1/\beta_2$, a relative $O(1-\beta_2)$ difference). $P$ is
built from the $\Sigma$-free update $S(\nu, g)$, exactly as the stable flow and the sharpness
probe build it, so that below the edge ($X = 0$) this *is* the stable flow and the quantity held
at the threshold is the one the probes report; the $\Sigma$ part of $\nu'$ (a relative
$O((1-\beta_2)\,\Delta f/\nu)$ change of $P$) is left out of $P$ to keep the problem for $X$ linear.

**X.** On the active Ritz pairs (eigenvalue $\ge (1 - \text{tol})$ threshold) the matrix $M$ must
not grow past the threshold. $\dot M$ is affine in $X$, $\dot M = B + \mathcal A(X)$ (its
$\mathcal A$ contains the third derivatives $\nabla_w u_a^\top D H D u_b$, by nested autodiff,
and the $\nu$-feed), and $X$ solves the complementarity problem on the PSD cone

.. math::

    X \succeq 0, \qquad Y = \kappa(\theta I - M) - \dot M \succeq 0, \qquad \langle X, Y\rangle = 0

($\theta$ the threshold, $\kappa$ a restoring rate that returns rounding drift above the
threshold; $\kappa = 0$ is the textbook condition $\dot M \preceq 0$). With one critical
direction and GD this is $\sigma^2 = \max(0, -2\langle\nabla S, g\rangle/\|\nabla S\|^2)$.
It is solved inside JAX by Douglas-Rachford splitting (a fixed number of iterations, each a
$p\times p$ solve and a $k\times k$ eigen-projection, $p = k(k+1)/2$), then polished by one exact
solve on the face it identified; the polish is kept only if it satisfies the conditions.

**Eigenvectors.** The vector field runs ``num_iter`` Lanczos steps on $D H D$ from a *fixed*
start vector: the flow's initial top-$k$ eigenvectors plus a fixed random vector, so that the
Krylov space holds the current critical directions and any new ones. A fixed start makes the
Ritz vectors a smooth function of the state, which an adaptive ODE solver needs (a warm start
carried from the previous evaluation would make the vector field history-dependent).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .._errors import InputError
from .._sharpness import lanczos, optimizer_sharpness
from .._tree import tree_sub
from ..optimizers import GD, AbstractOptimizer, AbstractRMSProp, Phase, Slow
from ..optimizers._base import ema, second_moment_feed
from ._base import AbstractFlow, check_states, slow_scale
from ._complementarity import _eigh, solve_psd_complementarity, sym_basis, to_mat, to_vec

_HI = jax.lax.Precision.HIGHEST


def supports(optimizer: AbstractOptimizer) -> str | None:
    """``None`` if the central flow is defined for ``optimizer``, else the reason it is not.

    It is written for GD and the RMSProps (an optional EMA second moment, no first moment).
    """
    if isinstance(optimizer, (GD, AbstractRMSProp)):
        return None
    return f"the central flow is defined for GD and the RMSProps only, not '{optimizer.name}'"


def check_supported(optimizer: AbstractOptimizer) -> None:
    reason = supports(optimizer)
    if reason is not None:
        raise InputError(reason)


class CentralState(NamedTuple):
    phase: Phase
    slow: Slow  # scaled by the flow's ``scale``


# --- the flow -----------------------------------------------------------------------------------
class CriticalSystem(NamedTuple):
    """Everything the central flow solves for at one state (flat parameter space)."""

    eigenvalues: jax.Array  # (k,) Ritz values of D H D, largest first
    threshold: jax.Array
    active: jax.Array  # (k,) bool: eigenvalue >= (1 - tol) threshold
    directions: jax.Array  # (n, k) critical directions W = D U in parameter space
    matrix: jax.Array  # (k, k) M = W^T H W
    A: jax.Array  # (p, p) linear part of dM/dt in X (sym_basis coordinates)
    b: jax.Array  # (p,) dM/dt at X = 0, minus the restoring target
    x: jax.Array  # (p,) the solution X
    residual: jax.Array  # (p,) Y = kappa (theta I - M) - dM/dt at the solution
    sigma_grad: jax.Array  # (n,) (1/2) grad_w <H, Sigma>
    sigma_feed: jax.Array  # (n,) or (): Delta f, the oscillation's feed of the second moment


class CentralFlow(AbstractFlow):
    """Central flow of GD or an RMSProp on ``loss_fn``; see the module docstring."""

    construction: ClassVar[str] = "central"

    start: jax.Array  # (n,) fixed Lanczos start vector
    k: int = eqx.field(static=True, default=2)
    num_iter: int = eqx.field(static=True, default=24)
    active_tol: jax.Array = eqx.field(converter=jnp.asarray, default=1e-2)  # traced: no recompiles
    restoring: jax.Array = eqx.field(converter=jnp.asarray, default=1.0)
    solver_iter: int = eqx.field(static=True, default=200)

    def __check_init__(self):
        check_supported(self.optimizer)

    # flat helpers
    def _flat(self, params):
        x, unravel = ravel_pytree(params)
        return x, unravel, (lambda v: ravel_pytree(jax.grad(self.loss_fn)(unravel(v)))[0])

    def _d(self, x, nu, count, unravel, grad_flat):
        """``D = P^-1/2`` as a flat vector (ones for GD), ``P`` from the Sigma-free ``S(nu, g)``."""
        opt = self.optimizer
        if not isinstance(opt, AbstractRMSProp):  # GD: no preconditioner
            return jnp.ones_like(x)
        p = opt.preconditioner(opt.slow_map(Slow(count, nu), unravel(grad_flat(x))))
        return jnp.broadcast_to(1.0 / jnp.sqrt(ravel_pytree(p)[0]), x.shape)

    def _feed(self, HW, Xm):
        """``Delta f`` for ``Sigma = W X W^T``: ``diag(H Sigma H)`` or its trace (scalar RMSProp)."""
        d = jnp.einsum("ab,an,bn->n", Xm, HW, HW, precision=_HI)
        return jnp.sum(d) if self.optimizer.scalar else d

    def _nu_dot(self, slow: Slow, g, unravel, feed):
        """``S(s) - s`` with the second moment fed ``f(g) + feed``; the count advances at rate 1."""
        opt = self.optimizer
        if slow.nu is None:
            return Slow(jnp.ones_like(slow.count), None)
        extra = feed if opt.scalar else unravel(feed)
        f = jax.tree.map(jnp.add, second_moment_feed(g, opt.scalar), extra)
        return tree_sub(Slow(slow.count + 1, ema(slow.nu, f, opt.decay)), slow)

    def system(self, y: CentralState) -> CriticalSystem:
        """Ritz pairs, the complementarity data, and its solution ``X`` at state ``y``."""
        opt = self.optimizer
        slow = self.unscaled(y.slow)
        x, unravel, grad_flat = self._flat(y.phase.params)
        n, k = x.shape[0], self.k
        E = sym_basis(k, x.dtype)
        eta, theta = opt.eta(slow), opt.threshold(slow)
        g = grad_flat(x)
        d = self._d(x, slow.nu, slow.count, unravel, grad_flat)
        _, hvp = jax.linearize(grad_flat, x)
        evals, evecs = lanczos(lambda v: d * hvp(d * v), self.start, min(self.num_iter, n))
        lam, U = evals[::-1][:k], evecs[:, ::-1][:, :k]
        active = lam >= (1.0 - self.active_tol) * theta
        W = d[:, None] * U

        def hvp_at(z, v):
            return jax.jvp(grad_flat, (z,), (v,))[1]

        def m_fixed(z):  # coordinates of W^T H(z) W, W held fixed: <H, Sigma> = x . m
            return to_vec(E, W.T @ jax.vmap(lambda v: hvp_at(z, v), in_axes=1, out_axes=1)(W))

        def phi(z, nu):  # M with W = D(z, nu) U following the state: what must stay <= theta
            Wz = self._d(z, nu, slow.count, unravel, grad_flat)[:, None] * U
            return Wz.T @ jax.vmap(lambda v: hvp_at(z, v), in_axes=1, out_axes=1)(Wz)

        M, phi_lin = jax.linearize(phi, x, slow.nu)
        grads_m = jax.jacrev(m_fixed)(x)  # (p, n): third derivatives by nested autodiff
        HW = jax.vmap(hvp, out_axes=0)(W.T)  # (k, n)
        d2 = d * d
        # velocity at X = 0 and per unit of each coordinate of X (the velocity is affine in X)
        dx0 = -eta * d2 * g
        dxq = -0.5 * eta * d2[None, :] * grads_m
        if slow.nu is None:
            dnu0 = dnuq = None
        else:  # nu' - nu at X = 0, and (1 - decay) Delta f per coordinate of X
            feeds = jax.vmap(lambda e: self._feed(HW, e))(E)
            dnu0 = self._nu_dot(slow, unravel(g), unravel, jnp.zeros_like(feeds[0])).nu
            feeds = (1.0 - opt.decay) * feeds
            dnuq = feeds if opt.scalar else jax.vmap(unravel)(feeds)
        b0 = to_vec(E, phi_lin(dx0, dnu0))
        A = jax.vmap(lambda dx, dn: to_vec(E, phi_lin(dx, dn)), out_axes=1)(dxq, dnuq)
        target = to_vec(E, self.restoring * (theta * jnp.eye(k, dtype=x.dtype) - M))
        b = b0 - target
        sol = solve_psd_complementarity(A, b, active, self.solver_iter)
        sigma_grad = 0.5 * sol.x @ grads_m
        sigma_feed = self._feed(HW, to_mat(E, sol.x)) if slow.nu is not None else jnp.zeros((), x.dtype)
        return CriticalSystem(lam, theta, active, W, M, A, b, sol.x, sol.residual, sigma_grad, sigma_feed)

    def vector_field(self, t, y: CentralState, args) -> CentralState:
        return self.vector_field_from(y, self.system(y))

    def vector_field_from(self, y: CentralState, sys: CriticalSystem) -> CentralState:
        """The vector field given the state's solved :meth:`system`."""
        opt = self.optimizer
        slow = self.unscaled(y.slow)
        unravel = ravel_pytree(y.phase.params)[1]
        g = self.grad(y.phase.params)
        new_slow = opt.slow_map(slow, g)  # Sigma-free, as the stable flow: P below the edge
        g_avg = jax.tree.map(jnp.add, g, unravel(sys.sigma_grad))
        d_phase = tree_sub(opt.fast_map(y.phase, g_avg, slow, new_slow), y.phase)
        return CentralState(d_phase, self.scaled(self._nu_dot(slow, g, unravel, sys.sigma_feed)))

    def centre(self, y: CentralState) -> Phase:
        return y.phase

    def slow(self, y: CentralState) -> Slow:
        return self.unscaled(y.slow)

    def predicted_loss(self, y: CentralState) -> jax.Array:
        r"""Time-averaged loss $L(w) + \tfrac12 \langle H, \Sigma\rangle$."""
        return self.predicted_loss_from(y, self.system(y))

    def predicted_loss_from(self, y: CentralState, sys: CriticalSystem) -> jax.Array:
        return self.loss_fn(y.phase.params) + 0.5 * jnp.sum(to_mat(sym_basis(self.k, sys.x.dtype), sys.x) * sys.matrix)

    def predicted_variance(self, y: CentralState) -> jax.Array:
        return jnp.sum(self.variance(y))

    def variance(self, y: CentralState) -> jax.Array:
        r"""Eigenvalues of $\Sigma$ (largest first, length ``k``): the oscillation variances
        $\sigma_i^2$ along its principal directions in parameter space; their sum is
        $\operatorname{tr}\Sigma = E\|x\|^2$, to set against $|r|^2$ of the rod and the iterates."""
        sys = self.system(y)
        return sigma_variances(sys)


def sigma_variances(sys: CriticalSystem) -> jax.Array:
    """Nonzero eigenvalues of ``Sigma = W X W^T`` via ``X^1/2 (W^T W) X^1/2``, largest first."""
    E = sym_basis(sys.directions.shape[1], sys.x.dtype)
    mu, V = _eigh(to_mat(E, sys.x))
    half = (V * jnp.sqrt(jnp.maximum(mu, 0.0))) @ V.T
    G = sys.directions.T @ sys.directions
    return _eigh(half @ G @ half)[0][::-1]


@eqx.filter_jit
def _initial_directions(optimizer, loss_fn, params, slow, k):
    return optimizer_sharpness(optimizer, loss_fn, params, slow, k, "auto").vectors


def check_central_options(num_params: int, *, k: int = 2, num_iter: int = 24, restoring=1.0, **_) -> None:
    """One-line :class:`InputError` for options no central flow on ``num_params`` parameters can
    take; drivers call it before the discrete run, so a bad ``--central-k`` costs nothing."""
    if k < 1 or num_iter < k:
        raise InputError(f"central flow needs 1 <= k <= num_iter, got k={k}, num_iter={num_iter}")
    if k > num_params:
        raise InputError(f"central flow needs k <= the number of parameters ({num_params}), got k={k}")
    if isinstance(restoring, (int, float)) and not restoring >= 0:
        raise InputError(f"central flow needs a restoring rate >= 0, got {restoring}")


def central_flow(
    optimizer: AbstractOptimizer,
    loss_fn,
    z0: Phase,
    s0: Slow,
    s1: Slow,
    *,
    k: int = 2,
    num_iter: int = 24,
    active_tol: float = 1e-2,
    restoring: float = 1.0,
) -> tuple[CentralFlow, CentralState]:
    """The central flow started at the discrete state ``(z0, s0)`` (``s1`` sets the scale).

    The Lanczos start vector is fixed here: the normalised sum of the top-``k`` (preconditioned)
    eigenvectors at ``z0`` plus an equal-weight fixed random vector.
    """
    check_supported(optimizer)
    check_states("central_flow", {"z0": z0}, {"s0": s0, "s1": s1})
    x = ravel_pytree(z0.params)[0]
    check_central_options(x.size, k=k, num_iter=num_iter, restoring=restoring)
    warm = jnp.sum(_initial_directions(optimizer, loss_fn, z0.params, s0, k), axis=1)
    noise = jax.random.normal(jax.random.PRNGKey(0), x.shape, x.dtype)
    start = warm / jnp.linalg.norm(warm) + noise / jnp.linalg.norm(noise)
    flow = CentralFlow(optimizer, loss_fn, slow_scale(s1), start, k, num_iter, active_tol, restoring)
    return flow, CentralState(z0, flow.scaled(s0))


@eqx.filter_jit
def variance_trajectory(flow: CentralFlow, params, slow) -> jax.Array:
    """:meth:`CentralFlow.variance` at stacked states (``params``, unscaled ``slow``, leading
    axis m), as an ``(m, k)`` array; one compilation, a sequential ``lax.map`` over the states."""

    def one(state):
        p, s = state
        return flow.variance(CentralState(Phase(p, None), flow.scaled(s)))

    return jax.lax.map(one, (params, slow))
