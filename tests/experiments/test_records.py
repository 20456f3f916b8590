"""One definition of every record: a one-configuration sweep is compare; golden outputs kept."""

import json
from pathlib import Path

import jax
import pytest
from helpers import assert_records_close, tiny_mlp

import rodflow_jax as rf

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "pre_engine.json").read_text())


def _make(seed):
    return tiny_mlp(0)[0], tiny_mlp(seed)[1]


@pytest.mark.parametrize("name, hp, models", [
    ("heavy_ball", {"learning_rate": 0.4, "momentum": 0.5}, ("discrete", "stable", "rod", "inertial", "inertial_stable")),
    ("adam", {"learning_rate": 0.02, "b1": 0.5, "b2": 0.99}, ("discrete", "stable", "rod")),
])
def test_one_configuration_sweep_is_compare(name, hp, models):
    loss, p0 = _make(0)
    opt = rf.make_optimizer(name, **hp)
    c = rf.compare(loss, p0, opt, 50, models=models)
    s = rf.sweep(_make, name, {k: [v] for k, v in hp.items()}, [0], 50, models=models)
    (row,) = s.records
    assert row.pop("hyperparameters") == hp and row.pop("seed") == 0
    assert_records_close(row, c.metrics, rtol=1e-12)
    for key in ("discrete_loss", *(f"{m}_loss" for m in models if m != "discrete")):
        got = s.arrays[key][0]
        want = c.trajectories[key][: got.shape[0]] if key == "discrete_loss" else c.trajectories[key][c.metrics["start_step"]:-1]
        assert got.tolist() == pytest.approx(want.tolist(), rel=1e-12, nan_ok=True)


@pytest.fixture
def two_iterate_start(monkeypatch):
    """The goldens predate the rods' period-2 start (flows/_rod.py): at order 1, the half
    difference of the two iterates, the engine must reproduce them. Caches cleared on both
    sides, so no program traced at the other order is reused. They also predate the endpoints'
    sequential evaluation on a CPU (``flows/_base.over_endpoints``): the same field to 1e-12
    (tests/flows), but the toy's catapults amplify its last-bit differences to 2 % in the max
    error, so the goldens are compared with the endpoints batched, as they were recorded."""
    from rodflow_jax.experiments import _hypergrad
    from rodflow_jax.flows import _base, _rod

    def clear():
        jax.clear_caches()
        _hypergrad.objective_fn.cache_clear()

    clear()
    monkeypatch.setattr(_rod, "PERIOD_TWO_ORDER", 1)  # read by period_two_order in every driver
    monkeypatch.setattr(_base, "ENDPOINTS", "vmap")
    # and the rods' rounding seed and short-rod sampling (stop 34; flows/_rounding.py)
    monkeypatch.setattr(_rod, "sample_floor", lambda dtype: 0.0)
    monkeypatch.setattr(_rod, "step_rounding", lambda *args, **kw: None)
    yield
    clear()


def _golden_compare(prob, opt_name, steps):
    p = rf.get_problem(prob)
    loss_fn, params0 = p.make(0)
    hp = {"learning_rate": p.learning_rates[opt_name], **p.hyperparameters.get(opt_name, {})}
    # the goldens are the first-order rod's: "rod" now runs each optimizer's default construction
    return rf.compare(loss_fn, params0, rf.make_optimizer(opt_name, **hp), steps, sharpness_method="lanczos",
                      models=("discrete", "stable", "rod1"))


def test_compare_keeps_the_pre_engine_numbers_on_toy(two_iterate_start):
    """Kept on purpose: the discrete run, the flows' errors and losses (the same kernels' arithmetic).
    Changed on purpose (README, "What changed in the engine"): probes (adaptive Lanczos), the
    variance metric (drift-free amplitude), eos_fraction (from the onset on)."""
    old = GOLDEN["compare/toy/gd"]["metrics"]
    new = _golden_compare("toy", "gd", 300).metrics
    for key in ("num_steps", "start_step", "num_params", "threshold", "eos_onset_step"):
        assert new[key] == pytest.approx(old[key], rel=1e-9), key
    assert new["discrete"]["final_loss"] == pytest.approx(old["discrete"]["final_loss"], rel=1e-9)
    for flow, was in (("stable", "stable"), ("rod1", "rod")):
        for key in ("param_rel_error_max", "param_rel_error_final", "loss_rel_error_mean", "loss_window_log_error",
                    "solver_steps", "rejected_steps"):
            assert new[flow][key] == pytest.approx(old[was][key], rel=1e-6), (flow, key)
        assert new[flow]["sharpness_final"] == pytest.approx(old[was]["sharpness_final"], rel=1e-4)


@pytest.mark.slow
def test_compare_keeps_the_pre_engine_numbers_on_deep_linear(two_iterate_start):
    old = GOLDEN["compare/deep-linear/heavy_ball"]["metrics"]
    new = _golden_compare("deep-linear", "heavy_ball", 200).metrics
    assert new["discrete"]["final_loss"] == pytest.approx(old["discrete"]["final_loss"], rel=1e-9)
    for flow, was in (("stable", "stable"), ("rod1", "rod")):
        for key in ("param_rel_error_max", "param_rel_error_final", "loss_rel_error_mean"):
            assert new[flow][key] == pytest.approx(old[was][key], rel=1e-6), (flow, key)


def test_hypergradients_keep_the_pre_engine_values(two_iterate_start):
    p = rf.get_problem("toy")
    loss_fn, params0 = p.make(0)
    opt = rf.make_optimizer("gd", learning_rate=p.learning_rates["gd"])
    old = GOLDEN["hypergrad/toy/gd"]
    v, g = rf.hypergradient(loss_fn, params0, opt, 100, objective="mean_loss_last:20", model="rod1", start_step=0)
    assert [v, g["learning_rate"]] == pytest.approx(old["rod_mean_loss_last:20"], rel=1e-6)
    v, g = rf.hypergradient(loss_fn, params0, opt, 100, objective="final_loss", model="discrete")
    assert [v, g["learning_rate"]] == pytest.approx(old["discrete_final_loss"], rel=1e-9)
