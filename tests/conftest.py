import os
import shutil
import sys
import tempfile
from pathlib import Path


def _share_compiled_programs() -> Path | None:
    """One persistent compilation cache for the whole test run: the xdist workers and every
    subprocess they start (the CLI, notebook kernels, benchmark scripts) inherit it through the
    environment from the process that made it, so a program one test compiled is loaded, not
    recompiled, by the next test that builds the same one (new closures over the same problem give
    the same HLO; programs dropped by ``relieve_map_pressure`` come back from disk). Measured on
    the 2-core CPU, the suite with ``-n 2``: 1,359 s -> 1,129 s. The folder is new for each run and
    removed at its end, so no run's timing depends on an earlier one; a cache the caller set is
    kept. Returns the folder this process made, if any."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    folder = Path(tempfile.mkdtemp(prefix="rodflow-tests-jax-cache-"))
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    return folder


_CACHE_MADE_HERE = _share_compiled_programs()  # before jax reads its configuration from the environment

import jax  # noqa: E402
import pytest  # noqa: E402

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


def pytest_sessionfinish(session, exitstatus):
    """The run's compilation cache goes with the process that made it (the xdist controller)."""
    if _CACHE_MADE_HERE is not None:
        shutil.rmtree(_CACHE_MADE_HERE, ignore_errors=True)
