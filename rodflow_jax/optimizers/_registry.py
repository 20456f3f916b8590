"""Optimizers by name, with input checks that give one clear line."""

from __future__ import annotations

import dataclasses

from .._errors import InputError, unknown_name
from ._adam import Adam, NAdam, ScalarAdam, ScalarNAdam
from ._base import AbstractOptimizer
from ._momentum import GD, HeavyBall, Nesterov
from ._rmsprop import RMSProp, ScalarRMSProp

OPTIMIZERS: dict[str, type[AbstractOptimizer]] = {
    cls.name: cls
    for cls in (GD, HeavyBall, Nesterov, RMSProp, ScalarRMSProp, Adam, ScalarAdam, NAdam, ScalarNAdam)
}


def hyperparameter_names(name: str) -> list[str]:
    """The hyperparameters (optax's names) that optimizer ``name`` takes."""
    cls = _lookup(name)
    return [f.name for f in dataclasses.fields(cls)]


def _lookup(name: str) -> type[AbstractOptimizer]:
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise unknown_name("optimizer", name, OPTIMIZERS) from None


def make_optimizer(name: str, **hyperparameters) -> AbstractOptimizer:
    """Build an optimizer by name, e.g. ``make_optimizer("adam", learning_rate=1e-3, b1=0.9)``.

    ``learning_rate`` is required; it may be a number or a schedule ``count -> eta``. Other
    hyperparameters take optax's defaults. Raises :class:`InputError` for an unknown name, an
    unknown hyperparameter or a value out of range.
    """
    cls = _lookup(name)
    valid = hyperparameter_names(name)
    unknown = sorted(set(hyperparameters) - set(valid))
    if unknown:
        raise InputError(
            f"optimizer '{name}' takes no hyperparameter {', '.join(map(repr, unknown))}; "
            f"it takes: {', '.join(valid)}"
        )
    if hyperparameters.get("learning_rate") is None:
        raise InputError(f"optimizer '{name}' needs a learning_rate")
    return cls(**{k: v for k, v in hyperparameters.items() if v is not None})
