import sys
from pathlib import Path

import jax
import pytest

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
