"""The real optimizer: ``lax.scan`` over steps, in chunks so long runs show progress."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._tree import tree_all_finite
from .optimizers import AbstractOptimizer, Phase, Slow


class DiscreteRun(NamedTuple):
    """A discrete run of ``num_steps`` steps (states ``z_0 .. z_num_steps``)."""

    loss: np.ndarray  # (num_steps + 1,) L(z_k); NaN from the first non-finite step on
    saved_steps: np.ndarray  # (m,) the steps k whose state was kept
    phase: Phase  # leaves with leading axis (m,): z_k at ``saved_steps``
    slow: Slow  # leaves with leading axis (m,): s_k at ``saved_steps``
    diverged: bool
    diverged_at: int | None  # first step k whose loss or state is not finite

    def state_at(self, k: int) -> tuple[Phase, Slow]:
        """``(z_k, s_k)`` for a saved step ``k``, as JAX arrays."""
        i = int(np.searchsorted(self.saved_steps, k))
        if i >= len(self.saved_steps) or self.saved_steps[i] != k:
            raise KeyError(f"step {k} was not saved")
        return jax.tree.map(lambda x: jnp.asarray(x[i]), (self.phase, self.slow))

    @property
    def params(self):
        return self.phase.params


def states_at(optimizer: AbstractOptimizer, loss_fn, params0, K: int):
    """``(z_K, s_K, z_{K+1}, s_{K+1})`` by a ``lax.scan`` of K steps: pure, so it can be jitted,
    vmapped over configurations and differentiated (sweeps, hypergradients)."""
    grad = jax.grad(loss_fn)

    def body(state, _):
        phase, slow = state
        return optimizer.step(phase, slow, grad(phase.params)), None

    state0 = optimizer.init(params0)
    zK, sK = jax.lax.scan(body, state0, None, length=K)[0] if K else state0
    z1, s1 = optimizer.step(zK, sK, grad(zK.params))
    return zK, sK, z1, s1


@eqx.filter_jit
def _chunk(optimizer: AbstractOptimizer, loss_fn, phase, slow, save_mask):
    """Run ``len(save_mask)`` steps; return losses, finiteness, and states where ``save_mask``."""
    vg = jax.value_and_grad(loss_fn)

    def body(carry, save):
        phase, slow = carry
        loss, g = vg(phase.params)
        finite = jnp.isfinite(loss) & tree_all_finite(phase)
        new_phase, new_slow = optimizer.step(phase, slow, g)
        kept = jax.tree.map(lambda x: jnp.where(save, x, jnp.zeros_like(x)), (phase, slow))
        return (new_phase, new_slow), (loss, finite, kept)

    return jax.lax.scan(body, (phase, slow), save_mask)


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
    """Run the optimizer for ``num_steps`` steps from ``params0``.

    Records ``L(z_k)`` for ``k = 0 .. num_steps`` and the phase and slow state at
    ``save_steps`` (default: every step; pass a sparse list for a large model, whose every
    parameter vector need not be held). Divergence (a non-finite loss or state) is recorded as
    ``diverged_at`` = the first such step, never raised.
    """
    phase, slow = optimizer.init(params0)
    total = num_steps + 1  # the loss at z_num_steps too
    all_steps = np.arange(total)
    save_steps = all_steps if save_steps is None else np.unique(np.asarray(save_steps, int))
    save_steps = save_steps[(save_steps >= 0) & (save_steps < total)]
    n_chunks = -(-total // chunk_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"discrete {optimizer.name}", unit="step", leave=False)
    losses, finite, kept = [], [], []
    for c in range(n_chunks):
        # every chunk has the same length (one compilation); the tail past ``total`` is dropped
        steps = np.arange(c * chunk_size, (c + 1) * chunk_size)
        mask = np.isin(steps, save_steps)
        (phase, slow), (l, f, s) = _chunk(optimizer, loss_fn, phase, slow, jnp.asarray(mask))
        valid = steps < total
        losses.append(np.asarray(l)[valid])
        finite.append(np.asarray(f)[valid])
        idx = np.nonzero(mask & valid)[0]
        kept.append(jax.tree.map(lambda x: np.asarray(x)[idx], s))
        if bar is not None:
            bar.update(int(valid.sum()))
    if bar is not None:
        bar.close()
    loss = np.concatenate(losses)
    ok = np.concatenate(finite)
    diverged_at = None if ok.all() else int(np.argmin(ok))
    if diverged_at is not None:
        loss[diverged_at:] = np.nan
    kept_phase, kept_slow = jax.tree.map(lambda *x: np.concatenate(x), *kept)
    return DiscreteRun(loss, save_steps, kept_phase, kept_slow, diverged_at is not None, diverged_at)
