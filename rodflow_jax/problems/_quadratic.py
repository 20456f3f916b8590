"""Diagonal convex quadratic ``L(w) = 1/2 sum_i lambda_i w_i^2``.

The Hessian is constant, so there is no progressive sharpening and no edge of stability for the
non-adaptive methods: the registry's default learning rates put ``lambda_max`` at 0.9 of each
method's stability threshold. (Adaptive methods shrink their preconditioner with the gradient,
so their preconditioned sharpness still climbs to the threshold eventually.)
"""

from __future__ import annotations

import jax.numpy as jnp


def default_spectrum(dim: int = 10):
    """``dim`` eigenvalues log-spaced from 0.1 to 10."""
    return jnp.logspace(-1.0, 1.0, dim)


def quadratic(spectrum, w0=None):
    """Return ``(loss_fn, params0)`` for ``L(w) = 1/2 sum_i spectrum_i w_i^2``.

    ``params0 = {"w": w0}`` with ``w0`` defaulting to ones; the Hessian is ``diag(spectrum)``.
    """
    spectrum = jnp.asarray(spectrum)
    if not jnp.issubdtype(spectrum.dtype, jnp.floating):
        spectrum = spectrum.astype(jnp.result_type(float))
    if spectrum.ndim != 1:
        raise ValueError(f"spectrum must be one-dimensional, got shape {spectrum.shape}")
    w0 = jnp.ones_like(spectrum) if w0 is None else jnp.asarray(w0, dtype=spectrum.dtype)
    if w0.shape != spectrum.shape:
        raise ValueError(f"w0 has shape {w0.shape}, expected {spectrum.shape}")

    def loss_fn(params):
        return 0.5 * jnp.sum(spectrum * params["w"] ** 2)

    return loss_fn, {"w": w0}


def make_quadratic(seed: int = 0, dim: int = 10):
    """The registered problem: the default spectrum, ``w0 = ones`` (``seed`` is ignored)."""
    del seed
    return quadratic(default_spectrum(dim))
