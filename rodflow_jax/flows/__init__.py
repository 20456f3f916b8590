"""Continuous-time models of an optimizer: stable flow, rod flow and central flow."""

from ._base import AbstractFlow as AbstractFlow
from ._inertial import (
    InertialRodFlow as InertialRodFlow,
    InertialState as InertialState,
    check_inertial as check_inertial,
    inertial_flow as inertial_flow,
)
from ._central import CentralFlow as CentralFlow, CentralState as CentralState, central_flow as central_flow
from ._rod import RodFlow as RodFlow, RodState as RodState, rod_flow as rod_flow
from ._stable import StableFlow as StableFlow, StableState as StableState, stable_flow as stable_flow

FLOW_KINDS = ("stable", "rod", "central", "inertial", "inertial_stable")


def make_flow(kind: str, optimizer, loss_fn, z0, s0, z1, s1, **options):
    """``(flow, y0)`` of the ``kind`` flow started from two consecutive discrete states.

    The rod starts at their midpoint; the stable and central flows at ``(z0, s0)`` (``s1`` sets
    the slow-state scale). ``"inertial"`` is the second-order rod flow of a momentum method and
    ``"inertial_stable"`` its ``r = 0`` limit (:func:`inertial_flow`). ``options`` go to
    :func:`rod_flow`, :func:`stable_flow` or :func:`central_flow`.
    """
    if kind in ("inertial", "inertial_stable"):
        return inertial_flow(optimizer, loss_fn, z0, s0, z1, s1, rod=kind == "inertial", **options)
    if kind == "rod":
        return rod_flow(optimizer, loss_fn, z0, s0, z1, s1, **options)
    if kind == "central":
        return central_flow(optimizer, loss_fn, z0, s0, s1, **options)
    if kind == "stable":
        return stable_flow(optimizer, loss_fn, z0, s0, s1, **options)
    raise ValueError(f"unknown flow {kind!r}; choose from {', '.join(FLOW_KINDS)}")
