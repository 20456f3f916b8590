"""Continuous-time models of an optimizer: stable flow, rod flow, central flow, inertial flows."""

from ._base import AbstractFlow as AbstractFlow
from ._central import CentralFlow as CentralFlow, CentralState as CentralState, central_flow as central_flow
from ._inertial import (
    AbstractInertialFlow as AbstractInertialFlow,
    InertialRodFlow as InertialRodFlow,
    InertialStableFlow as InertialStableFlow,
    InertialState as InertialState,
    check_inertial as check_inertial,
    inertial_flow as inertial_flow,
)
from ._registry import (
    FLOW_KINDS as FLOW_KINDS,
    FLOWS as FLOWS,
    FlowKind as FlowKind,
    flow_kind as flow_kind,
    make_flow as make_flow,
)
from ._rod import RodFlow as RodFlow, RodState as RodState, rod_flow as rod_flow
from ._rod import PERIOD_TWO_ORDER as PERIOD_TWO_ORDER, period_two_endpoints as period_two_endpoints
from ._rod import period_two_half as period_two_half
from ._stable import StableFlow as StableFlow, StableState as StableState, stable_flow as stable_flow
from ._second_order import SecondOrderFlow as SecondOrderFlow, second_order as second_order
