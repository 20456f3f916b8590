"""The nine optimizers as pure (slow map, fast map) pairs."""

from ._adam import Adam as Adam, NAdam as NAdam, ScalarAdam as ScalarAdam, ScalarNAdam as ScalarNAdam
from ._base import (
    AbstractAdaptiveOptimizer as AbstractAdaptiveOptimizer,
    AbstractMomentumMethod as AbstractMomentumMethod,
    AbstractOptimizer as AbstractOptimizer,
    Phase as Phase,
    Slow as Slow,
    describe as describe,
)
from ._momentum import GD as GD, HeavyBall as HeavyBall, Nesterov as Nesterov
from ._registry import (
    OPTIMIZERS as OPTIMIZERS,
    hyperparameter_names as hyperparameter_names,
    make_optimizer as make_optimizer,
)
from ._rmsprop import AbstractRMSProp as AbstractRMSProp, RMSProp as RMSProp, ScalarRMSProp as ScalarRMSProp
