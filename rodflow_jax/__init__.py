"""rodflow-jax: rod flow, stable flow and the real optimizer at the edge of stability."""

from ._discrete import DiscreteRun as DiscreteRun, run_discrete as run_discrete
from ._errors import InputError as InputError
from ._integrate import (
    FlowRun as FlowRun,
    Solution as Solution,
    SolverConfig as SolverConfig,
    integrate as integrate,
    solve as solve,
)
from ._sharpness import (
    ProbeTrajectory as ProbeTrajectory,
    SharpnessProbe as SharpnessProbe,
    hessian_vector_product as hessian_vector_product,
    lanczos as lanczos,
    optimizer_sharpness as optimizer_sharpness,
    probe_trajectory as probe_trajectory,
    top_eigenpairs as top_eigenpairs,
    top_eigenvalues as top_eigenvalues,
)
from .experiments import (
    Comparison as Comparison,
    SweepResult as SweepResult,
    check_problem as check_problem,
    compare as compare,
    default_start_step as default_start_step,
    estimate_hypergradient as estimate_hypergradient,
    hypergradient as hypergradient,
    sweep as sweep,
    tune as tune,
)
from .flows import FLOWS as FLOWS, FlowKind as FlowKind, make_flow as make_flow
from .flows import CentralFlow as CentralFlow, central_flow as central_flow
from .flows import InertialRodFlow as InertialRodFlow, InertialStableFlow as InertialStableFlow, inertial_flow as inertial_flow
from .flows import RodFlow as RodFlow, StableFlow as StableFlow, rod_flow as rod_flow, stable_flow as stable_flow
from .flows import PERIOD_TWO_ORDER as PERIOD_TWO_ORDER, period_two_endpoints as period_two_endpoints
from .flows import period_two_half as period_two_half
from .optimizers import (
    GD as GD,
    OPTIMIZERS as OPTIMIZERS,
    AbstractAdaptiveOptimizer as AbstractAdaptiveOptimizer,
    AbstractMomentumMethod as AbstractMomentumMethod,
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
from .optimizers._optax import from_optax as from_optax
from .flows import SecondOrderFlow as SecondOrderFlow, second_order as second_order
from .problems import PROBLEMS as PROBLEMS, get_problem as get_problem, load_user_problem as load_user_problem

__version__ = "0.2.0"
