"""Continuous-time models of an optimizer: stable flow, rod flow and central flow."""

from ._base import AbstractFlow as AbstractFlow
from ._central import CentralFlow as CentralFlow, CentralState as CentralState, central_flow as central_flow
from ._rod import RodFlow as RodFlow, RodState as RodState, rod_flow as rod_flow
from ._stable import StableFlow as StableFlow, StableState as StableState, stable_flow as stable_flow
