import jax
import jax.numpy as jnp
import pytest

from rodflow_jax import _resources as R

pytestmark = pytest.mark.skipif(R.map_limit() is None, reason="no /proc to read the map cap from")


def test_compiled_programs_hold_maps_until_the_caches_are_cleared():
    """The cause of the segfaults: every executable keeps maps until its cache entry goes."""
    before = R.map_count()
    fs = [jax.jit(lambda x, i=i: jnp.cumsum(jnp.sin(x * i) ** 2) @ jnp.cos(x)) for i in range(40)]
    for f in fs:
        f(jnp.ones(64)).block_until_ready()
    assert fs[0]._cache_size() == 1
    grown = R.map_count()
    assert grown > before
    assert not R.relieve_map_pressure(1.0)  # far below the cap: nothing is dropped
    assert fs[0]._cache_size() == 1
    assert R.relieve_map_pressure(0.0)  # over the (zero) threshold: the caches are cleared
    assert fs[0]._cache_size() == 0 and R.map_count() < grown
    assert float(fs[0](jnp.ones(64))) == pytest.approx(float(jnp.cumsum(jnp.zeros(64)) @ jnp.ones(64)))
