"""Load a user-defined problem from ``path/to/file.py:make``.

The file defines ``make(seed)`` (or ``make()``) returning ``(loss_fn, params0)``: a pure JAX
function ``params -> scalar loss`` and a pytree of floating arrays. Every problem with the file
or what it returns is reported as one :class:`InputError` line. With x64 enabled (the CLI's
``--float64``) floating-point parameters that ``make`` built narrower are widened to float64, so
the whole run is in double precision as that flag says.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
import uuid

import jax
import jax.numpy as jnp

from .._errors import leaf_kinds
from ._base import InputError


def _split_spec(spec: str) -> tuple[str, str]:
    """``"dir/f.py:fn"`` -> ``("dir/f.py", "fn")``; the function defaults to ``make``.

    Only a colon after the last path separator counts, so Windows drive letters survive.
    """
    head, sep, tail = spec.rpartition(":")
    if sep and head and not any(s in tail for s in ("/", "\\")):
        return head, tail or "make"
    return spec, "make"


def _import_file(path: str, label: str):
    module_name = f"_rodflow_user_problem_{uuid.uuid4().hex}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"problem file '{path}' cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up here
    folder = os.path.dirname(os.path.abspath(path))
    if folder not in sys.path:  # as `python file.py` would: the file can import the modules beside it
        sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # user code: report, don't crash
        sys.modules.pop(module_name, None)
        raise InputError(f"error while importing {label}: {type(e).__name__}: {e}") from e
    return module


def _arguments(fn, label: str, seed: int) -> tuple:
    """``(seed,)`` when ``fn`` accepts one positional argument, else ``()``; a function that can be
    called neither way is refused by its signature, before it runs."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return (seed,)
    for args in ((seed,), ()):
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return args
    raise InputError(f"{label} must be callable as make(seed) or make() -> (loss_fn, params0); "
                     f"its signature is {getattr(fn, '__name__', 'make')}{sig}")


def _check_params(params0, label: str) -> None:
    """At least one floating-point array leaf; other leaves (an equinox module's activation
    functions, integer buffers) are allowed and held fixed (only inexact arrays are trained)."""
    import equinox as eqx

    leaves = jax.tree_util.tree_leaves(params0)
    if not any(eqx.is_inexact_array(x) or isinstance(x, float) for x in leaves):
        raise InputError(f"{label} returned params0 with no floating-point array leaves (found {leaf_kinds(leaves)})")


def _widen_floats(params):
    """Floating-point leaves narrower than float64 as float64; every other leaf as it is. The
    loss then computes in float64 (its data promotes against the parameters)."""
    def widen(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 8:
            return jnp.asarray(x, jnp.float64)
        return x

    return jax.tree.map(widen, params)


def load_user_problem(spec: str, seed: int = 0):
    """Import ``path/to/file.py[:function]`` and return its checked ``(loss_fn, params0)``.

    ``function`` defaults to ``make`` and is called as ``make(seed)`` when it accepts one
    positional argument, else ``make()``. Raises :class:`InputError` when the file or function
    is missing, the return value is not ``(callable, pytree of floating arrays)``, or
    ``loss_fn(params0)`` is not a real scalar; errors raised by user code are wrapped too.
    """
    path, fn_name = _split_spec(str(spec))
    label = f"{path}:{fn_name}"
    if not os.path.exists(path):
        raise InputError(f"problem file '{path}' does not exist")
    if not os.path.isfile(path):
        raise InputError(f"problem file '{path}' is not a file")
    module = _import_file(path, path)

    fn = getattr(module, fn_name, None)
    if fn is None:
        raise InputError(f"problem file '{path}' defines no function '{fn_name}'")
    if not callable(fn):
        raise InputError(f"{label} is not callable (got {type(fn).__name__})")

    args = _arguments(fn, label, seed)
    try:
        result = fn(*args)
    except Exception as e:
        raise InputError(f"error while running {label}: {type(e).__name__}: {e}") from e

    if not (isinstance(result, tuple) and len(result) == 2):
        got = f"a {len(result)}-tuple" if isinstance(result, tuple) else type(result).__name__
        raise InputError(f"{label} returned {got}, expected (loss_fn, params0)")
    loss_fn, params0 = result
    if not callable(loss_fn):
        raise InputError(
            f"{label} returned a {type(loss_fn).__name__} as loss_fn, expected a callable"
        )
    _check_params(params0, label)
    if jax.config.jax_enable_x64:  # the CLI's --float64: the run in double precision, whatever make built
        params0 = _widen_floats(params0)

    try:
        loss = loss_fn(params0)
    except Exception as e:
        raise InputError(f"error while running loss_fn of {label}: {type(e).__name__}: {e}") from e
    try:
        loss = jnp.asarray(loss)
    except Exception:
        raise InputError(
            f"loss_fn of {label} must return a scalar, got {type(loss).__name__}"
        ) from None
    if loss.shape != ():
        raise InputError(f"loss_fn of {label} must return a scalar, got shape {loss.shape}")
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise InputError(
            f"loss_fn of {label} must return a real floating scalar, got dtype {loss.dtype}"
        )
    return loss_fn, params0
