"""Host copies of arrays that may span several processes (under ``jax.distributed``)."""

from __future__ import annotations

import jax
import numpy as np


def to_host(tree, take=None):
    """NumPy copies of a pytree's array leaves (``take``: only those indices of axis 1). A global
    array this process cannot read alone (under ``jax.distributed``) is indexed on the devices and
    then gathered with ``process_allgather``, a collective: every process must call this at the
    same point, and every process gets the whole array."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            if take is not None and len(take) == 0:  # nothing to gather (the same on every process)
                return np.zeros((x.shape[0], 0, *x.shape[2:]), x.dtype)

            return np.asarray(multihost_utils.process_allgather(x if take is None else x[:, take], tiled=True))
        x = np.asarray(x)
        return x if take is None else x[:, take]

    return jax.tree.map(one, tree)
