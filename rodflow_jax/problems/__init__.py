"""Training problems: ``make(seed) -> (loss_fn, params0)`` plus tuned optimizer defaults."""

from ._base import Problem as Problem
from ._registry import PROBLEMS as PROBLEMS
from ._registry import get_problem as get_problem
from ._registry import list_problems as list_problems
from ._user import load_user_problem as load_user_problem
from ._digits import digits_data as digits_data, init_mlp as init_mlp, mlp_apply as mlp_apply, mse_loss as mse_loss
