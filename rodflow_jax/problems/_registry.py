"""The registered problems, looked up by name.

The default learning rates were measured in float64 (hand-written optax update rules, the
(preconditioned) sharpness lambda_max(P^-1/2 H P^-1/2) by Lanczos on Hessian-vector products,
cross-checked against jax.hessian + eigh). ratio = sharpness / threshold; onset = first probed
step with ratio >= 0.95 (step 0 excluded); frac = share of probes after onset with ratio >= 0.9.

    problem          optimizer       lr      onset/steps  frac  max ratio  final loss
    toy              gd              0.4       50/500     0.98    1.19     0.031
                     heavy_ball      0.55      30/500     0.83    1.08     0.0044
                     nesterov        0.3       40/500     0.96    1.19     0.056
                     rmsprop         0.03     100/500     0.90    1.48    -1.1e-4
                     scalar_rmsprop  0.03     150/500     0.86    1.49    -7.2e-4
                     adam            0.2      150/500     0.89    1.07    -7.6e-4
                     scalar_adam     0.1      170/500     0.88    1.09    -7.9e-4
                     nadam           0.2       60/500     0.86    2.08    -1.6e-4
                     scalar_nadam    0.2       70/500     0.77    2.36    -8.3e-4
    mlp-digits       gd              0.2      160/1000    1.00    1.25     0.086
                     heavy_ball      0.3       60/1000    1.00    1.23     0.033
                     nesterov        0.15     110/1000    1.00    1.27     0.058
                     rmsprop         3e-4     240/1000    1.00    1.50     0.081
                     scalar_rmsprop  0.015    190/1000    0.93    1.60     0.082
                     adam            2e-3     260/1000    1.00    1.15     0.0051
                     scalar_adam     0.1      110/1000    0.93    1.07     0.012
                     nadam           1e-3     260/1000    1.00    1.49     0.020
                     scalar_nadam    0.03     180/1000    0.94    1.60     0.025
    mlp-digits-ce    gd              0.7      140/1000    1.00    1.26     0.16
                     heavy_ball      0.8      150/1000    0.45    1.74     0.026  (falls off)
                     nesterov        0.5      120/1000    0.93    1.27     0.071
                     rmsprop         9e-4     240/1000    1.00    1.44     0.24
                     scalar_rmsprop  0.06     120/1000    0.95    1.55     0.23
                     adam            4e-3     190/1000    0.77    1.61     2e-7   (falls off)
                     scalar_adam     0.4       90/1000    0.37    1.02     3e-10  (falls off)
                     nadam           3e-3     290/1000    0.76    1.30     0.0027
                     scalar_nadam    0.12     200/1000    0.97    1.38     7.7e-5
    cnn-digits       gd              0.2      140/600     0.87    1.30     0.15
                     heavy_ball      0.2      180/600     0.52    1.27     0.10   (sawtooth)
                     nesterov        0.15     100/600     0.72    1.57     0.12
                     rmsprop         2e-4     100/600     1.00    1.26     0.16
                     scalar_rmsprop  0.015    160/600     0.86    1.53     0.15
                     adam            2e-3     160/600     0.91    1.14     0.047
                     scalar_adam     0.1      160/600     0.95    1.01     0.044
                     nadam           1e-3     160/600     1.00    1.86     0.078
                     scalar_nadam    0.03     200/600     0.90    1.91     0.070
    transformer-sort gd              0.4      260/1000    1.00    1.34     0.092
                     heavy_ball      0.6      100/1000    0.96    1.46     0.0045
                     nesterov        0.3      180/1000    1.00    1.55     0.018
                     rmsprop         6e-4     180/1000    1.00    1.46     0.013
                     scalar_rmsprop  0.03     180/1000    0.90    1.51     0.075
                     adam            2e-3     240/1000    0.84    1.29     2e-4
                     scalar_adam     0.05     300/1000    0.83    1.22     0.0071
                     nadam           1.5e-3   240/1000    0.89    1.67     6.4e-4
                     scalar_nadam    0.06     220/1000    0.59    2.00     0.019
    deep-linear      gd              0.16      10/600     0.98    1.44     0.12
                     heavy_ball      0.23      10/600     0.98    1.25     0.050
                     nesterov        0.115     10/600     0.98    1.25     0.050
                     rmsprop         0.01      10/500     1.00    1.21     0.021
                     scalar_rmsprop  0.06     100/500     0.78    1.58     0.0083
                     adam            0.1      140/500     0.38    1.10     2.8e-5
                     scalar_adam     0.2      180/500     0.56    1.12     4.4e-4
                     nadam           0.05      30/500     0.92    1.47     0.0043
                     scalar_nadam    0.3       90/500     0.62    2.26     6.4e-7
    (deep-linear: GD/momentum rates are chosen above 2/lambda of the gradient-flow solution,
    whose sharpness is 1.2-1.25x their threshold; at lower rates, e.g. GD 0.13, the run settles
    on a minimum just under the threshold and the oscillation dies out. The GD/momentum rows
    report the last probe, "max ratio" = final.)
    quadratic: gd/heavy_ball/nesterov sit at 0.90 of the threshold throughout; the adaptive
    methods stay below it (max ratio 0.03-0.58) for the 500 default steps.

Probes were every 10 steps (cnn-digits, transformer-sort: 20; toy: every 5 in the search).
"""

from __future__ import annotations

import difflib

from ._base import InputError, Problem
from ._deep_linear import make_deep_linear
from ._digits import make_cnn_digits, make_mlp_digits
from ._quadratic import make_quadratic
from ._toy import make_toy
from ._transformer import make_transformer_sort

_MOMENTUM = {"heavy_ball": {"momentum": 0.5}, "nesterov": {"momentum": 0.5}}
_RMS = {"rmsprop": {"decay": 0.99}, "scalar_rmsprop": {"decay": 0.99}}
# b2 = 0.99 makes Adam/NAdam settle at the edge within ~1000 steps; the scalar variants
# (one nu for all coordinates) show large sawtooth cycles at 0.99/0.999 but hover at 0.95.
_ADAM = {"adam": {"b2": 0.99}, "nadam": {"b2": 0.99}}
_SCALAR_ADAM = {"scalar_adam": {"b2": 0.95}, "scalar_nadam": {"b2": 0.95}}
_HPARAMS = {**_MOMENTUM, **_RMS, **_ADAM, **_SCALAR_ADAM}


def _lrs(gd, heavy_ball, nesterov, rmsprop, scalar_rmsprop, adam, scalar_adam, nadam, scalar_nadam):
    return dict(locals())


def _mlp_ce(seed: int = 0):
    # Without label noise the network fits the 500 digits within ~100 steps and the
    # cross-entropy sharpness collapses with the loss; 20% fixed noise keeps it at the edge.
    return make_mlp_digits(seed, loss="ce", label_noise=0.2)


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in (
        Problem(
            name="quadratic",
            description="diagonal convex quadratic, 10 dims, spectrum 0.1..10 (no EoS: "
            "lambda_max at 0.9x the GD/momentum threshold)",
            make=make_quadratic,
            default_steps=500,
            # gd/heavy_ball/nesterov: lambda_max = 10 = 0.9 x threshold; adaptive methods: their
            # preconditioned sharpness stays below the threshold for the default 500 steps
            learning_rates=_lrs(0.18, 0.27, 0.135, 0.01, 0.03, 0.03, 0.01, 0.03, 0.01),
            hyperparameters=_HPARAMS,
        ),
        Problem(
            name="toy",
            description="2-parameter self-stabilisation toy: sharpness grows until GD pins it "
            "at 2/eta",
            make=make_toy,
            default_steps=500,
            learning_rates=_lrs(0.4, 0.55, 0.3, 0.03, 0.03, 0.2, 0.1, 0.2, 0.2),
            hyperparameters={**_HPARAMS, "adam": {"b2": 0.95}, "nadam": {"b2": 0.95}},
        ),
        Problem(
            name="deep-linear",
            description="3-layer linear network 8-8-8-4 (160 params) fitting a fixed linear map, "
            "MSE: edge of stability from depth alone",
            make=make_deep_linear,
            default_steps=600,
            learning_rates=_lrs(0.16, 0.23, 0.115, 0.01, 0.06, 0.1, 0.2, 0.05, 0.3),
            hyperparameters=_HPARAMS,
            # float32, seeds 0-2: heavy ball diverges at steps 13, 21, 25 (benchmarks/float32_defaults.py)
            float64_only=frozenset({"heavy_ball"}),
        ),
        Problem(
            name="mlp-digits",
            description="tanh MLP 64-32-10 (2,410 params) on 500 sklearn digits, MSE loss",
            make=make_mlp_digits,
            default_steps=1000,
            learning_rates=_lrs(0.2, 0.3, 0.15, 3e-4, 0.015, 2e-3, 0.1, 1e-3, 0.03),
            hyperparameters=_HPARAMS,
        ),
        Problem(
            name="mlp-digits-ce",
            description="tanh MLP 64-32-10 (2,410 params) on 500 sklearn digits with 20% fixed "
            "label noise, cross-entropy",
            make=_mlp_ce,
            default_steps=1000,
            learning_rates=_lrs(0.7, 0.8, 0.5, 9e-4, 0.06, 4e-3, 0.4, 3e-3, 0.12),
            # heavy_ball, adam, scalar_adam and nadam fit the (noisy) labels fast enough that the
            # cross-entropy sharpness falls off the edge in the second half of the run
            hyperparameters={**_HPARAMS, "adam": {"b2": 0.95}, "scalar_adam": {"b2": 0.9}},
        ),
        Problem(
            name="cnn-digits",
            description="small tanh CNN (3,818 params) on 500 sklearn digits as 8x8 images, MSE",
            make=make_cnn_digits,
            default_steps=600,
            learning_rates=_lrs(0.2, 0.2, 0.15, 2e-4, 0.015, 2e-3, 0.1, 1e-3, 0.03),
            hyperparameters=_HPARAMS,
        ),
        Problem(
            name="transformer-sort",
            description="1-block transformer (d_model 16, 2 heads, 2,552 params) sorting 256 "
            "length-6 sequences, square loss on one-hot targets",
            make=make_transformer_sort,
            default_steps=1000,
            learning_rates=_lrs(0.4, 0.6, 0.3, 6e-4, 0.03, 2e-3, 0.05, 1.5e-3, 0.06),
            hyperparameters=_HPARAMS,
        ),
    )
}


def get_problem(name: str) -> Problem:
    """The registered problem ``name``; :class:`InputError` listing the valid names otherwise."""
    try:
        return PROBLEMS[name]
    except KeyError:
        pass
    valid = sorted(PROBLEMS)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise InputError(f"unknown problem '{name}'{hint}; choose one of: {', '.join(valid)}")


def list_problems() -> list[Problem]:
    """All registered problems, in registration order."""
    return list(PROBLEMS.values())
