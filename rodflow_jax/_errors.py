"""Errors raised for bad user input, and range checks that skip traced values."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import jax
import numpy as np


class InputError(ValueError):
    """Bad user input: the CLI reports it as one line and exits with code 2."""


def leaf_kinds(leaves) -> str:
    """What a pytree's leaves are, for a refusal: ``"float"``, ``"int32 array"``, ``"str"``, ..."""
    kinds = {f"{x.dtype} array" if hasattr(x, "dtype") and hasattr(x, "shape") else type(x).__name__ for x in leaves}
    return ", ".join(sorted(kinds)) or "nothing"


def _concrete(x) -> float | None:
    """Return ``x`` as a Python float, or ``None`` if it is a tracer or a callable."""
    if callable(x) or isinstance(x, jax.core.Tracer):
        return None
    arr = np.asarray(x)
    if arr.shape != ():
        return None
    return float(arr)


def check_positive(name: str, value) -> None:
    v = _concrete(value)
    if v is not None and not (v > 0 and np.isfinite(v)):
        raise InputError(f"{name} must be a positive finite number, got {v:.8g}")


def check_nonnegative(name: str, value) -> None:
    v = _concrete(value)
    if v is not None and not (v >= 0 and np.isfinite(v)):
        raise InputError(f"{name} must be >= 0, got {v:.8g}")


def check_unit_interval(name: str, value) -> None:
    """Check ``0 <= value < 1`` (momentum and decay rates)."""
    v = _concrete(value)
    if v is not None and not (0.0 <= v < 1.0):
        raise InputError(f"{name} must lie in [0, 1), got {v:.8g}")  # 8 digits: -0.1 in float32 reads -0.1


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> InputError:
    """An error for an unknown name that lists the valid ones and suggests the closest."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return InputError(f"unknown {kind} '{name}'{hint}; choose one of: {', '.join(valid)}")
