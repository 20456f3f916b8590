"""Named pytree arithmetic: the one home for ad-hoc ``tree_map`` lambdas."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def tree_sub(a, b):
    return jax.tree.map(jnp.subtract, a, b)


def tree_axpy(alpha, x, y):
    """``alpha * x + y``."""
    return jax.tree.map(lambda xi, yi: alpha * xi + yi, x, y)


def tree_mean2(a, b):
    """``(a + b) / 2``."""
    return jax.tree.map(lambda x, y: 0.5 * (x + y), a, b)


def tree_half_diff(a, b):
    """``(a - b) / 2``."""
    return jax.tree.map(lambda x, y: 0.5 * (x - y), a, b)


def tree_stack2(a, b):
    """Two like-structured trees as one with a leading axis of 2 (for a ``vmap`` over both)."""
    return jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)


def tree_unstack2(t):
    """Inverse of :func:`tree_stack2`."""
    return jax.tree.map(lambda x: x[0], t), jax.tree.map(lambda x: x[1], t)


def _total(terms):
    """The sum of scalar terms in their own dtype. (Seeding ``sum`` with ``jnp.zeros(())`` would
    promote float32 terms to float64 whenever x64 is enabled: a float32 model's scalar second
    moment then changed dtype inside the scan carry.)"""
    terms = list(terms)
    return functools.reduce(jnp.add, terms) if terms else jnp.zeros(())


def tree_vdot(a, b):
    return _total(jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y, precision=_HI), a, b)))


def tree_sum_squares(a):
    return _total(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(a))


def tree_norm(a):
    """The Euclidean norm over all leaves, with a finite (zero) derivative at 0."""
    ss = tree_sum_squares(a)
    pos = ss > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, ss, 1.0)), 0.0)


def tree_zeros_like(a):
    return jax.tree.map(jnp.zeros_like, a)


def tree_all_finite(a):
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(a)]))


def tree_where(pred, a, b):
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)
