"""The :class:`Problem` record: a named training problem with tuned defaults."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from ..optimizers import OPTIMIZERS
from .._errors import InputError as InputError  # noqa: F401  (re-exported for the problem modules)

PyTree = Any
LossFn = Callable[[PyTree], Any]

# The optimizers every registered problem has a default learning rate for.
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A named training problem.

    ``make(seed)`` returns ``(loss_fn, params0)``: a pure function ``params -> scalar loss`` and
    the initial parameters (a pytree of floating arrays). ``learning_rates`` holds a default
    learning rate for every optimizer name, chosen so that the discrete run enters the edge of
    stability within ``default_steps`` steps (measurements in ``_registry.py``);
    ``hyperparameters`` holds the non-default optimizer hyperparameters the rates were tuned
    with, under optax's names (``momentum``, ``decay``, ``b1``, ``b2``, ``eps``).
    """

    name: str
    description: str
    make: Callable[[int], tuple[LossFn, PyTree]]
    default_steps: int
    learning_rates: Mapping[str, float]
    hyperparameters: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)
    # optimizers whose default rate is stable only in float64 (measured: benchmarks/float32_defaults.py)
    float64_only: frozenset = frozenset()

    def __post_init__(self):
        # defensive copies: problems must not share (and so co-mutate) the registry's dicts
        object.__setattr__(self, "learning_rates", dict(self.learning_rates))
        object.__setattr__(
            self, "hyperparameters", {k: dict(v) for k, v in self.hyperparameters.items()}
        )
