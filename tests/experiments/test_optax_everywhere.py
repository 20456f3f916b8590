"""``from_optax`` of a *factory*: its float arguments are array leaves, so an optax optimizer is
swept (vmapped) and differentiated exactly as the built-ins are, through the API and the CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rodflow_jax import InputError, make_optimizer, run_discrete
from rodflow_jax.cli import main
from rodflow_jax.experiments import sweep
from rodflow_jax.experiments._hypergrad import hypergradient, objective_value
from rodflow_jax.optimizers._optax import from_optax

from helpers import tiny_mlp


def test_factory_leaves_and_exactness():
    loss, p0 = tiny_mlp()
    opt = from_optax(optax.adamw, hyperparameters=dict(learning_rate=0.01, weight_decay=1e-3, nesterov=False))
    # float arguments (given and the signature's float defaults) are leaves; the rest is static
    assert set(opt.continuous_hyperparameters()) >= {"learning_rate", "weight_decay", "b1", "b2", "eps"}
    assert "nesterov" not in opt.continuous_hyperparameters() and opt.hyperparameters()["nesterov"] is False
    ref = from_optax(optax.adamw(0.01, weight_decay=1e-3))
    a, b = run_discrete(opt, loss, p0, 40), run_discrete(ref, loss, p0, 40)
    np.testing.assert_array_equal(np.asarray(a.loss), np.asarray(b.loss))
    # replacing a leaf is rebuilding the factory
    c = run_discrete(opt.with_hyperparameters(weight_decay=1e-1), loss, p0, 40)
    d = run_discrete(from_optax(optax.adamw(0.01, weight_decay=1e-1)), loss, p0, 40)
    np.testing.assert_array_equal(np.asarray(c.loss), np.asarray(d.loss))
    # an int given where the default is a float is a float leaf; an int default stays static
    af = from_optax(optax.adafactor, hyperparameters=dict(learning_rate=1, min_dim_size_to_factor=4))
    assert "learning_rate" in af.continuous_hyperparameters()
    assert "min_dim_size_to_factor" not in af.continuous_hyperparameters()


def test_built_transformation_cannot_be_swept_and_says_how():
    opt = from_optax(optax.adamw(0.01))
    with pytest.raises(InputError, match="wrap the factory"):
        opt.with_hyperparameters(learning_rate=0.02)
    f = from_optax(optax.adamw, hyperparameters=dict(learning_rate=0.01))
    with pytest.raises(InputError, match="no continuous hyperparameter 'nesterov'"):
        f.with_hyperparameters(nesterov=True)
    with pytest.raises(InputError, match="optax:adamw"):
        from_optax(optax.adamw, name="optax:adamw", hyperparameters=dict(learning_rate=0.01, bogus=1))


def test_hypergradient_of_optax_adam_equals_the_builtin_and_finite_differences():
    loss, p0 = tiny_mlp()
    wrapped = from_optax(optax.adam, hyperparameters=dict(learning_rate=0.02))
    builtin = make_optimizer("adam", learning_rate=0.02)
    wrapped_grads = {}
    for model in ("discrete", "rod1"):  # the same construction for both ("rod" is inertial for the built-in Adam)
        kw = dict(objective="mean_loss_last:10", model=model, wrt=("learning_rate", "b1"), start_step=5)
        vw, gw = hypergradient(loss, p0, wrapped, 60, **kw)
        vb, gb = hypergradient(loss, p0, builtin, 60, **kw)
        assert np.isclose(vw, vb, rtol=1e-9)
        for k in gw:
            assert np.isclose(gw[k], gb[k], rtol=1e-6), (model, k, gw[k], gb[k])
        wrapped_grads[model] = gw
    # and the wrapped optimizer's discrete hypergradient against a central difference of its own
    # objective (the discrete objective does not depend on the start step)
    h = 1e-5
    f = [objective_value(loss, p0, wrapped.with_hyperparameters(learning_rate=0.02 + s), 60,
                         objective="mean_loss_last:10", model="discrete") for s in (h, -h)]
    assert np.isclose(wrapped_grads["discrete"]["learning_rate"], (f[0] - f[1]) / (2 * h), rtol=1e-5)


def test_sweep_of_an_optax_argument_equals_solo_runs():
    res = sweep("quadratic", "optax:adamw", {"weight_decay": [1e-3, 1e-1]}, num_steps=60,
                models=("discrete", "stable", "rod"), opt_args={"learning_rate": 0.05}, start_step=0)
    assert [r["hyperparameters"] for r in res.records] == [{"weight_decay": 1e-3}, {"weight_decay": 1e-1}]
    assert res.info["fixed"]["learning_rate"] == 0.05
    from rodflow_jax.problems import get_problem

    loss, p0 = get_problem("quadratic").make(0)
    for wd, row in zip((1e-3, 1e-1), res.arrays["discrete_loss"]):
        solo = run_discrete(from_optax(optax.adamw(0.05, weight_decay=wd)), loss, p0, 60)
        np.testing.assert_allclose(row, np.asarray(solo.loss), rtol=1e-6)
    # the rows differ: the swept value reached the vmapped optimizer
    assert not np.allclose(res.arrays["rod_loss"][0], res.arrays["rod_loss"][1])


def test_cli_sweep_and_hypergrad_of_optax(tmp_path, capsys):
    out = tmp_path / "sw"
    code = main(["sweep", "--problem", "quadratic", "--optimizer", "optax:adamw", "--steps", "40", "--no-progress",
                 "--opt-args", "learning_rate=0.05,weight_decay=1e-3:1e-1:3:log", "--models", "discrete,rod", "--start-step", "0",
                 "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [round(r["hyperparameters"]["weight_decay"], 6) for r in rows] == [1e-3, 1e-2, 1e-1]
    f = tmp_path / "hg.json"
    code = main(["hypergrad", "--problem", "quadratic", "--optimizer", "optax:adamw", "--steps", "40",
                 "--opt-args", "learning_rate=0.05,weight_decay=1e-2", "--wrt", "learning_rate,weight_decay",
                 "--model", "discrete", "--out", str(f)])
    assert code == 0
    rep = json.loads(f.read_text())
    assert set(rep["gradient"]) == {"learning_rate", "weight_decay"}
    assert all(np.isfinite(v) for v in rep["gradient"].values())
    capsys.readouterr()
    # a static argument cannot be swept: one line, exit 2
    code = main(["sweep", "--problem", "quadratic", "--optimizer", "optax:adafactor", "--steps", "20", "--no-progress",
                 "--opt-args", "learning_rate=0.05,min_dim_size_to_factor=2:4:2",
                 "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "to sweep" in err[0], err
    assert not (tmp_path / "bad").exists()


def test_inertial_flows_refuse_a_wrapped_transformation_with_the_reason(tmp_path, capsys):
    code = main(["compare", "--problem", "quadratic", "--optimizer", "optax:sgd", "--steps", "20", "--no-progress",
                 "--opt-args", "learning_rate=0.1,momentum=0.9", "--models", "inertial", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "velocity form" in err[0] and "heavy_ball" in err[0]
    assert not (tmp_path / "o").exists()


def test_a_factory_that_cannot_take_tracers_keeps_its_floats_static():
    """optax's warmup_cosine_decay_schedule compares its peak with 0 in Python: built from tracers
    it fails, so the factory's floats stay static (compare works, a sweep says why not)."""
    def recipe(learning_rate, weight_decay=1e-2):
        sched = optax.warmup_cosine_decay_schedule(0.0, learning_rate, 5, 40)
        return optax.adamw(sched, weight_decay=weight_decay)

    opt = from_optax(recipe, hyperparameters=dict(learning_rate=0.05))
    assert opt.continuous_hyperparameters() == () and "TracerBoolConversionError" in opt.untraceable
    loss, p0 = tiny_mlp()
    ref = run_discrete(from_optax(recipe(0.05)), loss, p0, 30)
    np.testing.assert_array_equal(np.asarray(run_discrete(opt, loss, p0, 30).loss), np.asarray(ref.loss))
    with pytest.raises(InputError, match="cannot be built from traced arguments"):
        opt.with_hyperparameters(learning_rate=0.1)
