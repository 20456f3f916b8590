"""Hypergradients through the discrete optimizer, the stable flow and the rod flow vs finite differences."""

import json

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_mlp

from rodflow_jax import InputError, hypergradient, make_optimizer
from rodflow_jax.experiments import objective_fn
from rodflow_jax._integrate import SolverConfig
from rodflow_jax._tree import tree_vdot
from rodflow_jax.cli import main

LR, STEPS, H = 0.3, 20, 1e-5  # sharpness / threshold ~ 0.3: below the edge of stability
TIGHT = SolverConfig(diffrax.Tsit5(), 1e-11, 1e-13, 256)  # so FD of the flows is not solver noise


def _fd_lr(loss_fn, p0, name, hp, opt_name="gd", **kw):
    """Central difference in hyperparameter ``name``, both sides in one jitted vmapped call."""
    f = objective_fn(loss_fn, STEPS, config=TIGHT, **kw)
    x = jnp.asarray([hp[name] + H, hp[name] - H])

    @eqx.filter_jit
    def both(x):
        return jax.vmap(lambda v: f(make_optimizer(opt_name, **{**hp, name: v}), p0))(x)

    fp, fm = np.asarray(both(x))
    return (fp - fm) / (2 * H)


@pytest.mark.parametrize("model", ["discrete", "stable", "rod"])
def test_lr_hypergradient_matches_central_differences(model):
    loss_fn, p0 = tiny_mlp(0)
    opt = make_optimizer("gd", learning_rate=LR)
    value, g = hypergradient(loss_fn, p0, opt, STEPS, objective="mean_loss_last:5", model=model, config=TIGHT)
    fd = _fd_lr(loss_fn, p0, "learning_rate", {"learning_rate": LR}, objective="mean_loss_last:5", model=model)
    assert np.isfinite(value)
    assert g["learning_rate"] == pytest.approx(fd, rel=1e-4)


def test_discrete_sharpness_and_params0_gradients():
    loss_fn, p0 = tiny_mlp(0)
    opt = make_optimizer("gd", learning_rate=LR)
    value, g = hypergradient(loss_fn, p0, opt, STEPS, objective="final_sharpness", wrt=("learning_rate", "params0"))
    fd = _fd_lr(loss_fn, p0, "learning_rate", {"learning_rate": LR}, objective="final_sharpness", model="discrete")
    assert g["learning_rate"] == pytest.approx(fd, rel=1e-4)
    # params0: directional derivative along a random direction
    d = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape, x.dtype), p0)
    f = eqx.filter_jit(objective_fn(loss_fn, STEPS, objective="final_sharpness"))
    shift = lambda s: jax.tree.map(lambda p, v: p + s * v, p0, d)  # noqa: E731
    fd_dir = (f(opt, shift(H)) - f(opt, shift(-H))) / (2 * H)
    assert float(tree_vdot(g["params0"], d)) == pytest.approx(float(fd_dir), rel=1e-4)


def test_momentum_hypergradient_heavy_ball():
    loss_fn, p0 = tiny_mlp(0)
    hp = {"learning_rate": 0.1, "momentum": 0.5}
    opt = make_optimizer("heavy_ball", **hp)
    _, g = hypergradient(loss_fn, p0, opt, STEPS, objective="final_loss", wrt=("learning_rate", "momentum"))
    fd = _fd_lr(loss_fn, p0, "momentum", hp, objective="final_loss", model="discrete", opt_name="heavy_ball")
    assert g["momentum"] == pytest.approx(fd, rel=1e-4)


def test_bad_wrt_and_objective():
    loss_fn, p0 = tiny_mlp(0)
    opt = make_optimizer("gd", learning_rate=LR)
    with pytest.raises(InputError, match="b1"):
        hypergradient(loss_fn, p0, opt, STEPS, wrt=("b1",))
    with pytest.raises(InputError, match="objective"):
        hypergradient(loss_fn, p0, opt, STEPS, objective="median_loss")
    # stop-44 QA: loose spellings of K ran, and were recorded as written ("mean_loss_last: 5")
    for objective in ("mean_loss_last: 5", "mean_loss_last:+5", "mean_loss_last:05", "mean_loss_last:0",
                      "mean_loss_last:2.5", f"mean_loss_last:{STEPS + 1}"):
        with pytest.raises(InputError, match=r"mean_loss_last:K needs 1 <= K <= steps"):
            hypergradient(loss_fn, p0, opt, STEPS, objective=objective)


USER = """
import jax.numpy as jnp

def make():
    def loss(p):
        return 0.5 * jnp.sum(p["w"] ** 2 * jnp.array([1.0, 30.0])) + 0.25 * jnp.sum(p["w"] ** 4)
    return loss, {"w": jnp.array([1.0, 0.5])}
"""


def test_cli_hypergrad(tmp_path, capsys):
    f = tmp_path / "prob.py"
    f.write_text(USER)
    out = tmp_path / "hg.json"
    rc = main(["hypergrad", "--problem", f"{f}:make", "--optimizer", "gd", "--learning-rate", "0.02", "--steps", "30",
               "--objective", "mean_loss_last:10", "--model", "discrete", "--wrt", "learning_rate,params0",
               "--float64", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["gradient"]) == {"learning_rate"} and res["gradient"]["learning_rate"] < 0
    assert res["objective"] > 0 and res["params0_gradient_norm"] > 0
    rc = main(["hypergrad", "--problem", f"{f}:make", "--learning-rate", "0.02", "--objective", "mean_loss_last:x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("rodflow: error:") and err.count("\n") == 1


@pytest.mark.parametrize("model", ["discrete", "rod"])
def test_cli_hypergrad_of_a_diverged_run_records_the_step_and_no_gradient(tmp_path, capsys, model):
    """A QA pass read ``d/dlearning_rate = 0`` (discrete) and ``nan`` (rod) off a run that diverged
    at step 3: the derivative of a diverged run is no slope. Now: no gradient, the step, a note."""
    out = tmp_path / "hg.json"
    rc = main(["hypergrad", "--problem", "toy", "--steps", "40", "--learning-rate", "10", "--model", model,
               "--out", str(out), "--no-progress"])
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert rc == 0 and res["objective"] is None and res["gradient"] == {"learning_rate": None}
    k = res["diverged_at"]
    assert isinstance(k, int) and 0 < k < 10 and f"diverged at step {k}" in res["message"]
    assert "is not finite (exact, 1 run)" in text and f"note: the discrete run diverged at step {k}: no gradient" in text


def test_the_central_flow_is_refused_by_the_exact_estimator_and_auto_takes_es(capsys):
    """From the stop-43 QA pass: ``hypergrad --model central`` printed ``d/dlearning_rate = nan``
    on every problem (its field's Lanczos and complementarity solve have no finite derivative).
    The exact estimator now refuses it, naming es; ``auto`` takes es; the kind declares it."""
    from rodflow_jax.flows import FLOWS

    assert FLOWS["central"].not_differentiable and FLOWS["rod"].not_differentiable is None
    assert main(["hypergrad", "--problem", "toy", "--steps", "30", "--model", "central", "--estimator", "exact",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the central flow cannot be differentiated" in err and "--estimator es" in err
    assert main(["hypergrad", "--problem", "toy", "--steps", "30", "--model", "central", "--pairs", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(es, 4 runs)" in out and "nan" not in out


def test_the_api_gives_nan_not_zero_for_a_diverged_run_and_takes_one_name():
    """From the stop-43 API QA pass: ``hypergradient`` returned ``(nan, {'learning_rate': 0.0})``
    for a run that diverged (a zero reads as 'flat'), and ``wrt="learning_rate"`` was read letter
    by letter."""
    loss_fn, p0 = tiny_mlp(0)
    value, g = hypergradient(loss_fn, p0, make_optimizer("gd", learning_rate=50.0), 30, model="discrete",
                             objective="final_loss")
    assert not np.isfinite(value) and np.isnan(g["learning_rate"])
    value, g = hypergradient(loss_fn, p0, make_optimizer("gd", learning_rate=LR), 10, model="discrete",
                             objective="final_loss", wrt="learning_rate")
    assert set(g) == {"learning_rate"} and np.isfinite(g["learning_rate"])
