r"""The real optimizer: one ``lax.scan`` kernel with divergence freezing and a save mask.

:func:`rollout_chunk` is the kernel every driver uses (compare and sweep call it in chunks,
vmapped over configurations; hypergradients differentiate it). Per step ``k`` it records

* ``loss``: ``L(z_k)``, NaN once the configuration has diverged;
* ``half``: ``|z_{k+1} - z_k| / 2`` in parameter space, the drift-inclusive half step;
* ``amplitude``: ``|z_{k+1} - 2 z_k + z_{k-1}| / 4``, the *drift-free* half amplitude of a
  period-2 oscillation (the smooth drift cancels in the second difference), which is what a
  rod's ``|r|`` models;

and keeps the phase and slow state where the save mask is set. A configuration whose loss or
state stops being finite, or whose loss exceeds ``BLOWUP * (1 + |L(z_0)|)``, is *frozen* from
that step on (``where``), so NaNs never enter the arithmetic of the others in a batch.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._errors import InputError
from ._tree import tree_all_finite, tree_norm, tree_sub, tree_where
from .optimizers import AbstractOptimizer, Phase, Slow

BLOWUP = 1e6  # a loss above BLOWUP * (1 + |L(z_0)|) counts as diverged


class Carry(eqx.Module):
    """The scan's state between chunks."""

    phase: Phase
    slow: Slow
    prev: Any  # params one step before ``phase`` (for the drift-free amplitude)
    alive: jax.Array
    diverged_at: jax.Array  # -1 while alive
    limit: jax.Array


class Chunk(NamedTuple):
    """Per-step records of one chunk (leading axis: the chunk's steps)."""

    loss: jax.Array
    half: jax.Array
    amplitude: jax.Array
    saved: Any  # (Phase, Slow) at every step of the chunk (zeros where not saved), or None


def init_carry(optimizer: AbstractOptimizer, loss_fn, params0) -> Carry:
    phase, slow = optimizer.init(params0)
    limit = BLOWUP * (1.0 + jnp.abs(loss_fn(params0)))
    return Carry(phase, slow, params0, jnp.ones((), bool), jnp.full((), -1), limit)


def rollout_chunk(optimizer: AbstractOptimizer, loss_fn, carry: Carry, ks, num_steps: int, save_mask=None):
    """Steps ``ks`` (consecutive integers) of one configuration: pure, vmappable, differentiable.

    ``L(z_k)`` is recorded for ``k <= num_steps``; the state advances while ``k < num_steps``.
    ``save_mask`` (bool per step, or ``None`` for no saved states) marks the ``z_k`` kept.
    """
    vg = jax.value_and_grad(loss_fn)
    masks = jnp.zeros(ks.shape, bool) if save_mask is None else save_mask

    def body(c: Carry, x):
        k, save = x
        loss, g = vg(c.phase.params)
        finite = jnp.isfinite(loss) & (jnp.abs(loss) < c.limit) & tree_all_finite(c.phase)
        record = k <= num_steps
        alive = c.alive & (finite | ~record)
        new_phase, new_slow = optimizer.step(c.phase, c.slow, g)
        move = alive & (k < num_steps)
        step = tree_sub(new_phase.params, c.phase.params)
        half = 0.5 * tree_norm(step)
        second = tree_sub(step, tree_sub(c.phase.params, c.prev))
        amp = jnp.where(k > 0, 0.25 * tree_norm(second), jnp.nan)
        nan = jnp.full_like(half, jnp.nan)
        out = Chunk(
            jnp.where(alive & record, loss, jnp.nan),
            jnp.where(move, half, nan),
            jnp.where(move, amp, nan),
            None if save_mask is None else tree_where(save, (c.phase, c.slow), jax.tree.map(jnp.zeros_like, (c.phase, c.slow))),
        )
        c2 = Carry(
            tree_where(move, new_phase, c.phase),
            tree_where(move, new_slow, c.slow),
            tree_where(move, c.phase.params, c.prev),
            alive,
            jnp.where(c.alive & ~alive, k.astype(c.diverged_at.dtype), c.diverged_at),
            c.limit,
        )
        return c2, out

    return jax.lax.scan(body, carry, (ks, masks))


class DiscreteRun(NamedTuple):
    """A discrete run of ``num_steps`` steps (states ``z_0 .. z_num_steps``)."""

    loss: np.ndarray  # (num_steps + 1,) L(z_k); NaN from the first diverged step on
    saved_steps: np.ndarray  # (m,) the steps k whose state was kept
    phase: Phase  # leaves with leading axis (m,): z_k at ``saved_steps``
    slow: Slow  # leaves with leading axis (m,): s_k at ``saved_steps``
    diverged: bool
    diverged_at: int | None  # first step k whose loss or state is not finite (or exploded)
    half: np.ndarray | None = None  # (num_steps,) |z_{k+1} - z_k|/2
    amplitude: np.ndarray | None = None  # (num_steps,) |z_{k+1} - 2 z_k + z_{k-1}|/4 (NaN at 0)

    def state_at(self, k: int) -> tuple[Phase, Slow]:
        """``(z_k, s_k)`` for a saved step ``k``, as JAX arrays."""
        i = int(np.searchsorted(self.saved_steps, k))
        if i >= len(self.saved_steps) or self.saved_steps[i] != k:
            raise KeyError(f"step {k} was not saved")
        return jax.tree.map(lambda x: jnp.asarray(x[i]), (self.phase, self.slow))

    @property
    def params(self):
        return self.phase.params

    @classmethod
    def of(cls, rollout, i: int = 0) -> "DiscreteRun":
        """Configuration ``i`` of a batched :class:`~rodflow_jax.experiments._engine.Rollout`."""
        phase, slow = jax.tree.map(lambda x: x[i], rollout.saved)
        div = int(rollout.diverged_at[i])
        return cls(rollout.loss[i], rollout.saved_steps, phase, slow, div >= 0, div if div >= 0 else None,
                   rollout.half[i], rollout.amplitude[i])


def states_at(optimizer: AbstractOptimizer, loss_fn, params0, K: int):
    """``(z_K, s_K, z_{K+1}, s_{K+1})`` by a ``lax.scan`` of K steps: pure, so it can be jitted,
    vmapped over configurations and differentiated (hypergradients)."""
    window, sK, s1 = window_at(optimizer, loss_fn, params0, K, 1)
    return window[0], sK, window[1], s1


def window_at(optimizer: AbstractOptimizer, loss_fn, params0, K: int, order: int):
    """``([z_K, ..., z_{K+order}], s_K, s_{K+1})`` (``order >= 1``), as :func:`states_at`."""
    grad = jax.grad(loss_fn)

    def body(state, _):
        phase, slow = state
        nxt = optimizer.step(phase, slow, grad(phase.params))
        return nxt, nxt

    state0 = optimizer.init(params0)
    zK, sK = jax.lax.scan(body, state0, None, length=K)[0] if K else state0
    phases, slows = jax.lax.scan(body, (zK, sK), None, length=order)[1]
    window = [zK] + [jax.tree.map(lambda x: x[j], phases) for j in range(order)]
    return window, sK, jax.tree.map(lambda x: x[0], slows)


def run_discrete(
    optimizer: AbstractOptimizer,
    loss_fn,
    params0,
    num_steps: int,
    *,
    save_steps=None,
    chunk_size: int = 64,
    progress: bool = False,
) -> DiscreteRun:
    """Run the optimizer for ``num_steps`` steps from ``params0`` (a batch of one of
    :func:`rodflow_jax.experiments.rollout_batch`).

    Records ``L(z_k)`` for ``k = 0 .. num_steps`` and the phase and slow state at
    ``save_steps`` (default: every step; pass a sparse list for a large model). Divergence (a
    non-finite or exploding loss, a non-finite state) is recorded as ``diverged_at`` = the
    first such step, never raised.
    """
    from .experiments._engine import rollout_batch
    from .experiments._evaluate import batch_of_one
    from .experiments._spec import check_loss_shape, check_single_optimizer

    check_single_optimizer(optimizer, "run_discrete")
    check_loss_shape(loss_fn, params0)
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise InputError(f"num_steps must be a non-negative integer, got {num_steps!r}")

    r = rollout_batch(*batch_of_one(optimizer, params0), loss_fn, num_steps, save_steps, chunk_size=chunk_size, progress=progress,
                      desc=f"discrete {optimizer.name}")
    return DiscreteRun.of(r)
