import sys
from pathlib import Path

import jax
import pytest

from rodflow_jax._resources import relieve_map_pressure

sys.path.insert(0, str(Path(__file__).parent))  # `helpers` for the sub-folders' tests

jax.config.update("jax_enable_x64", True)

ALL_OPTIMIZERS = (
    "gd",
    "heavy_ball",
    "nesterov",
    "rmsprop",
    "scalar_rmsprop",
    "adam",
    "scalar_adam",
    "nadam",
    "scalar_nadam",
)


@pytest.fixture(params=ALL_OPTIMIZERS)
def optimizer_name(request):
    return request.param


@pytest.fixture(autouse=True)
def _release_compiled_programs():
    """A worker compiles thousands of programs; past the kernel's cap on memory maps LLVM
    segfaults, so the caches are cleared between tests once a third of the maps are used."""
    yield
    relieve_map_pressure(1 / 3)
