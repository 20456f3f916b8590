"""The flows by name: each declares which optimizers it supports and how it starts.

Every driver (compare, sweep, hypergradients, the benchmarks) looks a flow up here; nothing
else switches on a flow's name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from .._errors import InputError, unknown_name
from ..optimizers import AbstractOptimizer
from . import _central, _inertial
from ._central import central_flow
from ._inertial import inertial_flow
from ._rod import rod_flow
from ._second_order import DERIVATIVES, SECOND_ORDER_MARGIN, second_order, second_order_margin
from ._stable import stable_flow


def _everywhere(optimizer: AbstractOptimizer) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class FlowKind:
    """A registered flow: ``start(optimizer, loss_fn, z0, s0, z1, s1, **options) -> (flow, y0)``
    from two consecutive discrete states, and ``supports(optimizer)`` (``None``, or why not)."""

    name: str
    start: Callable
    supports: Callable[[AbstractOptimizer], str | None] = _everywhere
    models_oscillation: bool = False  # whether its state carries the oscillation (a rod)
    predicts_variance: bool = False  # whether ``predicted_variance`` is a prediction (rods, central)
    # whether the drivers start it from the iterates' period-2 part (z0, z1 replaced by
    # ``period_two_endpoints`` of z_K .. z_{K+PERIOD_TWO_ORDER}; see flows/_rod.py)
    period_two_start: bool = False
    # whether it is a second-order (corrected) flow: it takes the option ``derivative``
    second_order: bool = False
    # the flow a configuration is solved by instead when this one runs out of its step budget
    # (the second-order flows: their first-order flow; rodflow_jax.experiments._engine._fall_back)
    fallback: str | None = None
    # why its trajectory has no usable derivative (exact hypergradients refuse it), or None
    not_differentiable: str | None = None
    description: str = ""

    def own_options(self, options) -> dict:
        """``options`` less those only a second-order flow takes (``derivative``), unless this is one."""
        options = dict(options or {})
        if not self.second_order:
            options.pop("derivative", None)
        return options

    def check(self, optimizer: AbstractOptimizer) -> None:
        reason = self.supports(optimizer)
        if reason is not None:
            raise InputError(reason)


def _from_one_state(factory):
    """A flow that starts from ``(z0, s0)`` with ``s1`` setting the slow-state scale."""
    return lambda optimizer, loss_fn, z0, s0, z1, s1, **kw: factory(optimizer, loss_fn, z0, s0, s1, **kw)


def _inertial_start(rod: bool):
    return lambda optimizer, loss_fn, z0, s0, z1, s1, **kw: inertial_flow(
        optimizer, loss_fn, z0, s0, z1, s1, rod=rod, **kw
    )


def _second(start, exact_growth: bool = True):
    """The second-order (backward-error-corrected) version of a flow's start, with the growth
    along its oscillation made exact (``exact_growth``, the default) or not (``rod2_plain``);
    the option ``derivative`` is how the correction is evaluated
    (:meth:`~rodflow_jax.flows._second_order.SecondOrderFlow.corrected_field`), the others go to
    the flow's own start."""

    def corrected(*args, derivative: str = DERIVATIVES[0], **kw):
        flow, y0 = start(*args, **kw)
        return second_order(flow, exact_growth=exact_growth, derivative=derivative), y0

    return corrected


ROD_CONSTRUCTIONS = ("rod1", "rod2", "inertial", "inertial2")  # the four a default can be


def default_construction(optimizer: AbstractOptimizer) -> str:
    """The rod construction ``"rod"`` runs for ``optimizer`` (chosen by the fidelity grid, README
    "Which rod construction runs by default"): its type's ``rod_construction``, except that the
    second-order rod needs a margin (:func:`second_order_margin` >= 1.4: its r-mode keeps growing
    up to 1.4x the threshold; Nesterov up to momentum ~0.65, heavy ball ~0.15) and falls back to
    the inertial rod where the optimizer has one, else to the first-order rod; and an inertial
    default needs momentum > 0."""
    name = optimizer.rod_construction
    if name == "rod2":
        margin = second_order_margin(optimizer)
        if margin is None or margin < SECOND_ORDER_MARGIN:
            name = "inertial"
    if FLOWS[name].supports(optimizer) is not None:
        name = "rod1"
    return name


def resolve(name: str, optimizer: AbstractOptimizer) -> str:
    """``name`` with ``"rod"`` replaced by the construction it runs for ``optimizer`` (concrete,
    possibly batched: a batch gets one construction, by its smallest margin)."""
    return default_construction(optimizer) if name == "rod" else name


def _default_rod_start(optimizer, loss_fn, z0, s0, z1, s1, **kw):
    return FLOWS[default_construction(optimizer)].start(optimizer, loss_fn, z0, s0, z1, s1, **kw)


FLOWS: dict[str, FlowKind] = {
    k.name: k
    for k in (
        FlowKind("stable", _from_one_state(stable_flow), description="the rod collapsed to a point"),
        FlowKind("rod", _default_rod_start, models_oscillation=True, predicts_variance=True,
                 description="two consecutive iterates as one rod, in the optimizer's default construction "
                             "(one of rod1, rod2, inertial, inertial2: metrics.json's `construction`)"),
        # rod1 has no rounding seed: its solver holds r to atol, far above the seed (_integrate.half_atol)
        FlowKind("rod1", functools.partial(rod_flow, rounding_seed=False), models_oscillation=True,
                 predicts_variance=True, period_two_start=True, description="the first-order rod flow (generator R - id)"),
        FlowKind("rod2", _second(rod_flow), models_oscillation=True, predicts_variance=True, period_two_start=True,
                 second_order=True, fallback="rod1",
                 description="the second-order rod flow (backward-error-corrected generator v - Dv[v]/2, "
                             "its growth along r exact)"),
        FlowKind("rod2_plain", _second(rod_flow, exact_growth=False), models_oscillation=True, predicts_variance=True,
                 period_two_start=True, second_order=True, fallback="rod1",
                 description="rod2 without the exact growth along r (the ablation)"),
        FlowKind("central", _from_one_state(central_flow), _central.supports, predicts_variance=True,
                 not_differentiable="its field solves a complementarity problem on Lanczos eigenpairs, whose "
                                    "derivatives are not finite (measured: NaN on every problem tried)",
                 description="the time-averaged iterate (Cohen et al. 2025)"),
        FlowKind("inertial", _inertial_start(True), _inertial.supports, models_oscillation=True,
                 predicts_variance=True, description="the inertial rod flow: a rod in velocity form (momentum methods, the Adam family)"),
        FlowKind("inertial2", _second(_inertial_start(True)), _inertial.supports, models_oscillation=True,
                 predicts_variance=True, second_order=True, fallback="inertial",
                 description="the inertial rod flow, second-order corrected (unstable at momentum: see "
                             "rodflow_jax/flows/_second_order.py)"),
        FlowKind("inertial_stable", _inertial_start(False), _inertial.supports,
                 description="the inertial rod flow's r = 0 limit"),
    )
}
FLOW_KINDS = tuple(FLOWS)


def flow_kind(name: str) -> FlowKind:
    try:
        return FLOWS[name]
    except KeyError:
        raise unknown_name("flow", name, FLOWS) from None


def make_flow(kind: str, optimizer, loss_fn, z0, s0, z1, s1, **options):
    """``(flow, y0)`` of the ``kind`` flow started from two consecutive discrete states.

    The rod starts at their midpoint; the stable and central flows at ``(z0, s0)`` (``s1`` sets
    the slow-state scale). ``"inertial"`` is the second-order rod flow of a momentum method and
    ``"inertial_stable"`` its ``r = 0`` limit. ``options`` go to the flow's own constructor
    (:func:`rod_flow`, :func:`central_flow`, ...).
    """
    return flow_kind(kind).start(optimizer, loss_fn, z0, s0, z1, s1, **options)
