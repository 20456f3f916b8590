"""Trend estimators (es, smoothed) of hypergradients, and the tuning loop."""

import json

import numpy as np
import pytest

from rodflow_jax import InputError, estimate_hypergradient, make_optimizer, tune
from rodflow_jax.cli import main
from rodflow_jax.experiments import EstimatorSettings, objective_value
from rodflow_jax.experiments._estimators import offsets
from rodflow_jax.experiments._hypergrad import hypergradient_report

from helpers import tiny_mlp

LR, STEPS, OBJ = 0.3, 20, "mean_loss_last:5"  # below the edge: a smooth objective


@pytest.mark.parametrize("estimator", ["es", "smoothed"])
def test_trend_estimators_equal_the_derivative_of_a_smooth_objective(estimator):
    loss, p0 = tiny_mlp(0)
    opt = make_optimizer("heavy_ball", learning_rate=0.1, momentum=0.5)
    exact = estimate_hypergradient(loss, p0, opt, STEPS, objective=OBJ, wrt=("learning_rate", "momentum"),
                                   estimator="exact")
    est = estimate_hypergradient(loss, p0, opt, STEPS, objective=OBJ, wrt=("learning_rate", "momentum"),
                                 estimator=estimator, pairs=6, width=0.02)
    for k in exact.gradient:
        assert est.gradient[k] == pytest.approx(exact.gradient[k], rel=0.03), k
        assert est.stderr[k] is not None and est.stderr[k] >= 0
    assert est.runs == 12 and est.settings.name == estimator


def test_es_in_one_dimension_is_the_least_squares_slope_through_its_points():
    loss, p0 = tiny_mlp(0)
    settings = EstimatorSettings("es", pairs=3, width=0.1, seed=5)
    est = estimate_hypergradient(loss, p0, make_optimizer("gd", learning_rate=LR), STEPS, objective=OBJ,
                                 estimator=settings)
    u = offsets(settings, 1)[:, 0]
    xs = np.concatenate([LR * (1 + 0.1 * u), LR * (1 - 0.1 * u)])
    ys = [objective_value(loss, p0, make_optimizer("gd", learning_rate=float(x)), STEPS, objective=OBJ) for x in xs]
    slope = np.sum((np.asarray(ys) - np.mean(ys)) * (xs - LR)) / np.sum((xs - LR) ** 2)  # symmetric design
    assert est.gradient["learning_rate"] == pytest.approx(slope, rel=1e-9)
    assert est.value == pytest.approx(np.mean(ys), rel=1e-12)


def test_stratified_offsets():
    u = offsets(EstimatorSettings("es", pairs=8, seed=1), 2)
    assert u.shape == (8, 2) and np.all(np.abs(u) <= 1)
    for j in range(2):  # one |u| in each of 8 equal bins
        assert sorted(np.floor(np.abs(u[:, j]) * 8).astype(int)) == list(range(8))


def test_report_states_the_estimator_and_auto_default():
    loss, p0 = tiny_mlp(0)
    opt = make_optimizer("gd", learning_rate=LR)
    rep = hypergradient_report(loss, p0, opt, STEPS, objective=OBJ, model="discrete")
    assert rep["estimator"] == "es" and rep["samples"] == 32 and rep["estimator_settings"]["pairs"] == 16
    assert rep["standard_error"]["learning_rate"] is not None and rep["cost"]["runs"] == 32
    assert hypergradient_report(loss, p0, opt, STEPS, objective="final_loss", model="discrete")["estimator"] == "exact"
    with pytest.raises(InputError, match="exact estimator"):
        hypergradient_report(loss, p0, opt, STEPS, objective=OBJ, wrt=("params0",), estimator="es")
    with pytest.raises(InputError, match="unknown estimator"):
        hypergradient_report(loss, p0, opt, STEPS, objective=OBJ, estimator="magic")
    with pytest.raises(InputError, match="width"):
        hypergradient_report(loss, p0, opt, STEPS, objective=OBJ, estimator="es", width=0.9)


def test_tune_moves_a_too_small_rate_up_and_lowers_the_objective():
    loss, p0 = tiny_mlp(0)
    res = tune(loss, p0, make_optimizer("gd", learning_rate=0.05), 30, objective="mean_loss_last:5", iterations=4)
    first, last = res.history[0], res.history[-1]
    assert res.hyperparameters["learning_rate"] > 0.05 and last["objective"] < first["objective"]
    assert res.runs == 4 * 8


def test_cli_hypergrad_estimator_and_tune(tmp_path, capsys):
    f = tmp_path / "hg.json"
    assert main(["hypergrad", "--problem", "toy", "--steps", "60", "--objective", "mean_loss_last:20",
                 "--model", "rod", "--estimator", "es", "--pairs", "2", "--out", str(f)]) == 0
    rep = json.loads(f.read_text())
    assert rep["estimator"] == "es" and rep["samples"] == 4 and "learning_rate" in rep["standard_error"]
    assert "es, 4 runs" in capsys.readouterr().out
    g = tmp_path / "tune.json"
    assert main(["tune", "--problem", "toy", "--steps", "60", "--objective", "mean_loss_last:20", "--iterations", "2",
                 "--pairs", "2", "--no-progress", "--out", str(g)]) == 0
    rep = json.loads(g.read_text())
    assert len(rep["history"]) == 2 and rep["runs"] == 8
    assert main(["tune", "--problem", "toy", "--iterations", "0", "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_cli_tune_says_when_its_runs_diverged_and_refuses_what_it_ignored(tmp_path, capsys):
    """Stop-44 QA: a tune whose every estimate diverged printed `= nan` rows and a tuned value
    that was never run; `--step inf` ran (tuned: learning_rate=inf); `--start-step -1` with the
    discrete model was ignored (refused for a flow)."""
    base = ["tune", "--problem", "toy", "--steps", "60", "--objective", "mean_loss_last:20", "--pairs", "2",
            "--no-progress"]
    assert main(base + ["--iterations", "2", "--learning-rate", "3.0"]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out and out.count(": diverged (a run of the estimate diverged") == 2
    assert "note: every iteration diverged" in out
    for argv, match in ((base + ["--step", "inf"], "step must be a positive finite number, got inf"),
                        (base + ["--start-step", "-1"], "start step must lie in [0, steps - 2] = [0, 58], got -1"),
                        (["hypergrad", "--problem", "toy", "--steps", "60", "--model", "discrete", "--start-step", "100"],
                         "start step must lie in")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
