"""Sweeps: vmapped == solo runs, divergence isolated, sharded == unsharded, the CLI."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_mlp

from rodflow_jax import PERIOD_TWO_ORDER, integrate, make_flow, make_optimizer, period_two_endpoints, run_discrete, sweep
from rodflow_jax.cli import main

LRS = [0.3, 1.0, 60.0]  # below the edge, at the edge, diverging
SEEDS = [0, 1]
STEPS = 40


def make(seed):
    """Fixed data (seed 0's), seed-dependent initialisation."""
    return tiny_mlp(0)[0], tiny_mlp(seed)[1]


@pytest.fixture(scope="module")
def result():
    return sweep(make, "gd", {"learning_rate": LRS}, SEEDS, STEPS, models=("discrete", "rod"), probe_every=10)


def _solo(lr, seed):
    loss_fn, p0 = make(seed)
    opt = make_optimizer("gd", learning_rate=lr)
    run = run_discrete(opt, loss_fn, p0, STEPS)
    _, s0 = run.state_at(0)
    _, s1 = run.state_at(1)
    # the rods start from the iterates' period-2 part (rodflow_jax/flows/_rod.py)
    z0, z1 = period_two_endpoints([run.state_at(j)[0] for j in range(PERIOD_TWO_ORDER + 1)])
    flow, y0 = make_flow("rod", opt, loss_fn, z0, s0, z1, s1)  # GD's default construction (rod2)
    return run, integrate(flow, y0, 0, STEPS - 1)


def test_records_have_the_documented_keys(result):
    assert len(result.records) == len(LRS) * len(SEEDS)
    rec = result.records[0]
    assert rec["hyperparameters"] == {"learning_rate": 0.3} and rec["seed"] == 0
    for key in ("final_loss", "mean_loss", "eos_onset_step", "sharpness_final", "sharpness_ratio_final", "diverged"):
        assert key in rec["discrete"]
    for key in ("final_loss", "mean_loss", "param_rel_error_final", "param_rel_error_max", "failed"):
        assert key in rec["rod"]
    assert rec["discrete"]["sharpness_ratio_final"] < 1  # below the edge
    at_edge = result.records[2]
    assert at_edge["discrete"]["sharpness_ratio_final"] > 0.9


def test_vmapped_sweep_equals_solo_runs(result):
    for i, rec in enumerate(result.records):
        lr, seed = rec["hyperparameters"]["learning_rate"], rec["seed"]
        if lr > 10:
            continue
        run, fr = _solo(lr, seed)
        np.testing.assert_allclose(result.arrays["discrete_loss"][i], run.loss, rtol=1e-10)
        np.testing.assert_allclose(result.arrays["rod_loss"][i], fr.loss, rtol=1e-8)
        assert not rec["discrete"]["diverged"] and not rec["rod"]["failed"]


def test_diverging_configuration_is_recorded_and_isolated(result):
    for i, rec in enumerate(result.records):
        if rec["hyperparameters"]["learning_rate"] < 10:
            assert np.all(np.isfinite(result.arrays["discrete_loss"][i]))
            continue
        assert rec["discrete"]["diverged"] and rec["discrete"]["diverged_at"] is not None
        assert rec["discrete"]["final_loss"] is None
        assert rec["rod"]["failed"] or "stopped at step" in rec["rod"]["message"]
        if rec["rod"]["construction"] == "rod1":  # the default rod2 gave up: the record says why
            assert "rod2 ran out of its step budget" in rec["rod"]["message"], rec["rod"]["message"]
        # its flows had the budget of steps 0-2 (128 a step for rod2, 64 for rod1), not of all 40
        assert rec["rod"]["solver_steps"] <= 128 * rec["discrete"]["diverged_at"] + 16


SHARDED = textwrap.dedent(
    """
    import jax, numpy as np, sys
    jax.config.update("jax_enable_x64", True)
    sys.path.insert(0, {tests!r})
    from helpers import assert_records_close, tiny_mlp
    from rodflow_jax import sweep
    make = lambda seed: (tiny_mlp(0)[0], tiny_mlp(seed)[1])
    assert len(jax.devices()) == 2, jax.devices()
    kw = dict(models=("discrete", "rod"), probe_every=10)
    grid = {{"learning_rate": [0.3, 0.7, 1.0]}}  # 3 configurations x 1 seed, padded to 4
    a = sweep(make, "gd", grid, [0], 20, devices="all", **kw)
    b = sweep(make, "gd", grid, [0], 20, devices=None, **kw)
    for k in a.arrays:
        np.testing.assert_allclose(a.arrays[k], b.arrays[k], rtol=1e-10, atol=1e-14)
    assert a.info["devices"] == 2 and len(a.records) == 3
    for ra, rb in zip(a.records, b.records):
        # two devices running at once round 1e-16 apart from one device (README, "Many devices"):
        # the values agree to 1e-9, an adaptive solver may take one step more or fewer
        for m in ("rod",):
            for key in ("solver_steps", "rejected_steps"):
                x, y = ra[m].pop(key), rb[m].pop(key)
                assert abs(x - y) <= 1, (m, key, x, y)
        assert_records_close(ra, rb, rtol=1e-9)
    print("SHARDED_OK")
    """
)


@pytest.mark.slow
def test_sharded_equals_unsharded(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED.format(tests=str(Path(__file__).parents[1])))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]


USER = """
import jax, jax.numpy as jnp

def make(seed):
    w = 0.1 * jax.random.normal(jax.random.PRNGKey(seed), (2,))
    def loss(p):
        return 0.5 * jnp.sum(p["w"] ** 2 * jnp.array([1.0, 30.0])) + 0.25 * jnp.sum(p["w"] ** 4)
    return loss, {"w": w + jnp.array([1.0, 0.0])}
"""


def test_cli_sweep_writes_json_and_figures(tmp_path):
    f = tmp_path / "prob.py"
    f.write_text(USER)
    out = tmp_path / "sw"
    rc = main(["sweep", "--problem", f"{f}:make", "--optimizer", "gd", "--learning-rate", "0.01:0.06:3",
               "--seeds", "2", "--models", "discrete,rod", "--steps", "30", "--float64", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    recs = json.loads((out / "sweep.json").read_text())
    assert len(recs) == 6 and {"hyperparameters", "seed", "discrete", "rod"} <= set(recs[0])
    assert recs[0]["hyperparameters"]["learning_rate"] == pytest.approx(0.01)
    assert (out / "sweep_loss.png").exists() and (out / "sweep_sharpness.png").exists()


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--learning-rate", "0.1:0.2"], "A:B:N"),
        (["--learning-rate", "0.1,0.2", "--b1", "0.9"], "takes no hyperparameter 'b1'"),
        (["--learning-rate=-0.1,0.2"], "learning_rate must be a positive"),
        (["--learning-rate", "0:1:3:log"], "log range"),
        (["--learning-rate", "0.1", "--seeds", "x"], "--seeds"),
        (["--learning-rate", "0.1", "--top-k", "11"], "top-k must lie in 1..10"),
        (["--learning-rate", "0.1", "--probe-every", "11"], "probe-every must lie in 1..10"),
    ],
)
def test_cli_sweep_bad_input_is_one_line(flags, match, capsys):
    rc = main(["sweep", "--problem", "quadratic", "--optimizer", "gd", "--steps", "10", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and match in err and err.count("\n") == 1 and err.startswith("rodflow: error:")


def test_seed_dependent_data_is_refused():
    from rodflow_jax import InputError

    with pytest.raises(InputError, match="do not depend on the seed"):
        sweep(tiny_mlp, "gd", {"learning_rate": [0.1]}, [0, 1], 5)


def test_values_from_range():
    from rodflow_jax.experiments import values_from_range

    assert values_from_range("1:3:3") == [1.0, 2.0, 3.0]
    assert np.allclose(values_from_range("0.01:1:3:log"), [0.01, 0.1, 1.0])
    assert values_from_range("0.5,0.7") == [0.5, 0.7]
    assert jnp.asarray(values_from_range("2")).shape == (1,)


def test_cli_sweep_of_a_builtin_needs_no_grid(tmp_path):
    out = tmp_path / "sw"
    rc = main(["sweep", "--problem", "quadratic", "--optimizer", "gd", "--steps", "20", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    (rec,) = json.loads((out / "sweep.json").read_text())
    assert rec["hyperparameters"] == {} and rec["optimizer"]["learning_rate"] == pytest.approx(0.18)


def test_figures_of_a_sweep_whose_every_run_diverged(tmp_path):
    """A shard (or a sweep) in which every configuration diverged has no finite final loss: its
    figures are still drawn (a log axis with nothing on it made matplotlib raise, a traceback
    after the run had finished, and the atomic save then wrote nothing)."""
    from rodflow_jax._sweep_plot import plot_sweep

    nothing = {"final_loss": None, "sharpness_ratio_final": None}
    records = [{"hyperparameters": {"learning_rate": lr}, "seed": s, "discrete": dict(nothing), "rod": dict(nothing)}
               for lr in (0.3, 0.4) for s in (0, 1)]
    written = plot_sweep(records, tmp_path, title="all diverged")
    assert [p.name for p in written] == ["sweep_loss.png", "sweep_sharpness.png"]
    assert all(p.stat().st_size > 0 for p in written)


def test_a_diverged_row_is_marked_on_the_sweep_figures():
    """A diverged run has no final value: the curve skips it, so the figure marks where it was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rodflow_jax._sweep_plot import _mark_diverged

    records = [{"hyperparameters": {"learning_rate": lr}, "seed": s,
                "discrete": {"diverged": lr > 0.35 and s == 1, "final_loss": None if lr > 0.35 and s == 1 else 1.0}}
               for lr in (0.3, 0.4, 0.5) for s in (0, 1)]
    fig, ax = plt.subplots()
    _mark_diverged(ax, records, "learning_rate")
    (line,) = ax.get_lines()
    assert line.get_label() == "discrete diverged (2 runs)"
    assert list(line.get_xdata()) == [0.4, 0.5]
    plt.close(fig)


def test_api_inputs_that_raised_raw_exceptions_are_one_input_error():
    """From the stop-43 API QA pass: ``sweep(..., {"learning_rate": 0.3})`` raised 'float has no
    len()', ``seeds=2`` 'int is not iterable', an optax transformation an AttributeError;
    ``run_discrete`` with ``num_steps=-1`` a TypeError; ``integrate`` backwards diffrax's 'Empty saveat'."""
    import optax

    import rodflow_jax as rf
    from rodflow_jax import InputError

    one = rf.sweep("toy", "gd", {"learning_rate": 0.3}, num_steps=20, models=("discrete",), start_step=0)
    assert [r["hyperparameters"]["learning_rate"] for r in one.records] == [0.3]
    with pytest.raises(InputError, match=r"seeds must be a list of seeds, e.g. range\(2\)"):
        rf.sweep("toy", "gd", None, seeds=2, num_steps=20)
    with pytest.raises(InputError, match="takes an optimizer from rf.make_optimizer"):
        rf.sweep("toy", optax.adam(0.1), None, num_steps=20)
    loss_fn, params0 = rf.get_problem("toy").make(0)
    opt = rf.make_optimizer("gd", learning_rate=0.3)
    for n in (-1, 2.5, True):
        with pytest.raises(InputError, match="num_steps must be a non-negative integer"):
            rf.run_discrete(opt, loss_fn, params0, n)
    run = rf.run_discrete(opt, loss_fn, params0, 12)
    (z0, s0), (z1, s1) = run.state_at(4), run.state_at(5)
    flow, y0 = rf.rod_flow(opt, loss_fn, z0, s0, z1, s1)
    with pytest.raises(InputError, match="end_step must come after start_step"):
        rf.integrate(flow, y0, 10, 4)


def test_api_misuse_left_at_stop_43_gets_one_clear_error(tmp_path):
    """Left from the stop-43 API QA pass: dicts given to ``rod_flow`` for its states (an
    AttributeError deep inside), ``Comparison.save(5)`` (a folder named "5"), a vector loss given
    straight to ``run_discrete`` (jax's 'Gradient only defined for scalar-output functions'),
    and ``save`` on a full folder telling a Python caller to pass ``--overwrite``."""
    import jax.numpy as jnp

    import rodflow_jax as rf
    from rodflow_jax import InputError

    loss_fn, params0 = rf.get_problem("toy").make(0)
    opt = rf.make_optimizer("gd", learning_rate=0.3)
    run = rf.run_discrete(opt, loss_fn, params0, 6)
    (z0, s0), (z1, s1) = run.state_at(2), run.state_at(3)
    with pytest.raises(TypeError, match=r"rod_flow: z0 must be a Phase \(as run_discrete"):
        rf.rod_flow(opt, loss_fn, {"params": z0.params}, s0, z1, s1)
    with pytest.raises(TypeError, match="stable_flow: s1 must be a Slow"):
        rf.stable_flow(opt, loss_fn, z0, s0, dict(s1._asdict()))
    with pytest.raises(InputError, match="loss_fn must return a scalar, got shape"):
        rf.run_discrete(opt, lambda p: jnp.stack([loss_fn(p), loss_fn(p)]), params0, 3)
    nan_start = rf.run_discrete(opt, lambda p: loss_fn(p) * jnp.nan, params0, 3)
    assert nan_start.diverged_at == 0  # a result, recorded; not an input error

    cmp = rf.compare(loss_fn, params0, opt, 30, models=("discrete",), start_step=0)
    with pytest.raises(InputError, match=r"out_dir must be a folder path \(a str or a pathlib.Path\), got int 5"):
        cmp.save(5)
    cmp.save(tmp_path / "a")
    with pytest.raises(InputError, match=r"out_dir .* exists and is not empty; pass overwrite=True to replace it"):
        cmp.save(tmp_path / "a")
    cmp.save(tmp_path / "a", overwrite=True)
