"""Compiled programs are not free: each XLA CPU executable keeps its code in memory maps.

JAX keeps every executable it compiled for as long as its function can be called again; a
process that compiles many distinct programs (a loop of ``compare`` calls on new closures, a
fidelity grid, a test session) accumulates about 800 maps per comparison. Linux caps a process
at ``vm.max_map_count`` maps (65,530 by default); past it ``mmap`` fails inside LLVM and the
process dies with a segmentation fault in ``backend_compile_and_load`` (measured: ~100 maps/s
under the test suite, crash after ~10 minutes on one worker). :func:`relieve_map_pressure`
clears JAX's caches when a process has used a given fraction of its maps, before the next
compilation; the programs it drops are recompiled when next called.
"""

from __future__ import annotations

import gc
from pathlib import Path

import jax

_LIMIT_FILE = Path("/proc/sys/vm/max_map_count")
_MAPS_FILE = Path("/proc/self/maps")


def map_limit() -> int | None:
    """The kernel's per-process cap on memory maps, or ``None`` where the system has none to read."""
    try:
        return int(_LIMIT_FILE.read_text())
    except (OSError, ValueError):
        return None


def map_count() -> int | None:
    """This process's memory maps, or ``None`` where the system does not list them."""
    try:
        with open(_MAPS_FILE, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def relieve_map_pressure(fraction: float = 0.5) -> bool:
    """Clear JAX's compilation caches if this process uses more than ``fraction`` of its map cap;
    return whether it did."""
    limit = map_limit()
    if limit is None:
        return False
    count = map_count()
    if count is None or count <= fraction * limit:
        return False
    jax.clear_caches()
    gc.collect()
    return True
