"""Sharding the configuration axis of a batch over devices (a 1-D mesh)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def config_sharding(devices) -> jax.sharding.NamedSharding | None:
    """A ``NamedSharding`` splitting the leading (configuration) axis over ``devices``
    (``"all"``: ``jax.devices()``, the global list under ``jax.distributed``)."""
    if devices is None:
        return None
    devs = jax.devices() if devices == "all" else list(devices)
    mesh = jax.sharding.Mesh(np.asarray(devs), ("config",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("config"))


def pad_and_shard(tree, sharding):
    """Pad the leading axis to a multiple of the device count (repeating the last row) and place
    the array leaves (other leaves, e.g. a schedule, stay as they are)."""
    if sharding is None:
        return tree
    n = sharding.mesh.size
    arrays = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
    b = arrays[0].shape[0]
    extra = -b % n

    def place(x):
        if not hasattr(x, "shape"):
            return x
        x = jnp.asarray(x)
        x = jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)]) if extra else x
        return jax.device_put(x, sharding)

    return jax.tree.map(place, tree)
