"""rodflow-jax: rod flow, stable flow and the real optimizer at the edge of stability."""

from ._errors import InputError as InputError
from .optimizers import (
    GD as GD,
    OPTIMIZERS as OPTIMIZERS,
    AbstractOptimizer as AbstractOptimizer,
    Adam as Adam,
    HeavyBall as HeavyBall,
    NAdam as NAdam,
    Nesterov as Nesterov,
    Phase as Phase,
    RMSProp as RMSProp,
    ScalarAdam as ScalarAdam,
    ScalarNAdam as ScalarNAdam,
    ScalarRMSProp as ScalarRMSProp,
    Slow as Slow,
    make_optimizer as make_optimizer,
)

__version__ = "0.1.0"
