"""Sharding the configuration axis of a batch over devices (a 1-D mesh), on one process or many.

Under ``jax.distributed`` (several processes, one global mesh) every process runs the same code:
:func:`place` builds the global arrays from the (identical) host data of every process, and
:func:`to_host` gathers a global array to every process (``process_allgather``) where one
process alone cannot read it. On one process both are the plain ``device_put`` / ``np.asarray``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._host import to_host as to_host


def config_sharding(devices) -> jax.sharding.NamedSharding | None:
    """A ``NamedSharding`` splitting the leading (configuration) axis over ``devices``
    (``"all"``: ``jax.devices()``, the global list under ``jax.distributed``)."""
    if devices is None:
        return None
    devs = jax.devices() if devices == "all" else list(devices)
    mesh = jax.sharding.Mesh(np.asarray(devs), ("config",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("config"))


def place(x, sharding):
    """``x`` on ``sharding``; a sharding spanning other processes is filled from this process's
    copy of ``x`` (every process holds the same host data), one local shard at a time."""
    if sharding.is_fully_addressable:
        return jax.device_put(jnp.asarray(x), sharding)
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    host = to_host(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def pad_and_shard(tree, sharding, rows: int = 2, lead: int = 0):
    """Pad the leading axis with ``lead`` copies of the first row in front and to a multiple of
    ``rows`` times the device count behind (repeating the last row), and place the array leaves
    (other leaves, e.g. a schedule, stay as they are). Without a sharding (``None``: one device)
    nothing is placed.

    ``lead``: a job-array shard starting at row ``first`` of the whole grid is padded in front by
    ``first % (rows x devices)`` rows, so that each of its rows sits at the place in its call that
    it has in the whole sweep (a row rounds differently at another place: :func:`~._engine.row_blocks`).

    ``rows`` is the configurations of one call on each device (:func:`~._engine.row_blocks`: a
    sweep's batch size), so the padded batch splits into whole calls. XLA's CPU kernels round a
    batch of one row differently from one of two, and one of two differently from one of four; a
    row's result does not depend on its partners. Unpadded, 4 configurations on 2 processes x 2
    devices, one row each, ended 3e-10 away from the same sweep on one device (final discrete
    loss, 300 steps), and toy GD's lone row of 3 configurations in shards of 2 and 1 ended 6e-6
    off in the rod's loss, with 1,077 solver steps against the whole sweep's 1,074."""
    n = 1 if sharding is None else sharding.mesh.size
    arrays = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]
    b = arrays[0].shape[0]
    extra = -(b + lead) % (rows * n)

    def pad(x):
        if not hasattr(x, "shape"):
            return x
        x = jnp.asarray(x)
        x = jnp.concatenate([jnp.repeat(x[:1], lead, axis=0), x, jnp.repeat(x[-1:], extra, axis=0)]) \
            if lead or extra else x
        return x if sharding is None else place(x, sharding)

    return jax.tree.map(pad, tree)


def is_primary() -> bool:
    """True on the one process that writes files and prints (process 0; the only one by default)."""
    return jax.process_index() == 0


def all_agree(ok: bool) -> bool:
    """Process 0's ``ok`` on every process (a broadcast under ``jax.distributed``; else ``ok``), so
    a refusal found by process 0 alone (e.g. its output folder) stops every process."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
