"""The drivers: compare, sweep and hypergradients, on one engine of three kernels.

``_spec`` resolves and validates a run, ``_engine`` holds the batched kernels (rollout, solve,
probe loop), ``_evaluate`` lines them up for a batch, ``_records`` defines every metric once,
``_compare``/``_sweep``/``_hypergrad`` are thin drivers, ``_output`` and ``_signals`` make sure
nothing a user has is lost.
"""

from .._discrete import init_carry as init_carry, rollout_chunk as rollout_chunk
from ._compare import Comparison as Comparison, compare as compare, trajectories as trajectories
from ._engine import (
    FlowArrays as FlowArrays,
    ProbeArrays as ProbeArrays,
    Rollout as Rollout,
    probe_batch as probe_batch,
    rollout_batch as rollout_batch,
    solve_batch as solve_batch,
    stack_trees as stack_trees,
)
from ._evaluate import Evaluation as Evaluation, evaluate as evaluate
from ._estimators import ESTIMATORS as ESTIMATORS, Estimate as Estimate, EstimatorSettings as EstimatorSettings
from ._hypergrad import estimate_hypergradient as estimate_hypergradient, hypergradient as hypergradient, objective_fn as objective_fn, objective_value as objective_value
from ._merge import merge_shards as merge_shards
from ._output import check_output as check_output, output_dir as output_dir, write_json as write_json
from ._records import DiscreteRecord as DiscreteRecord, FlowRecord as FlowRecord, run_record as run_record
from ._sharding import config_sharding as config_sharding, pad_and_shard as pad_and_shard
from ._spec import (
    DEFAULT_MODELS as DEFAULT_MODELS,
    MODELS as MODELS,
    check_problem as check_problem,
    default_start_step as default_start_step,
    differentiable as differentiable,
    resolve_problem as resolve_problem,
)
from ._tune import TuneResult as TuneResult, tune as tune
from ._sweep import SweepResult as SweepResult, configurations as configurations, sweep as sweep
from ._sweep import values_from_range as values_from_range
