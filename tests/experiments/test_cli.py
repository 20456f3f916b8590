import json
import subprocess
import sys

import pytest

from rodflow_jax.cli import main

USER_PROBLEM = """
import jax.numpy as jnp

def make():
    def loss(p):
        return 0.5 * jnp.sum(p["w"] ** 2 * jnp.array([1.0, 30.0]))
    return loss, {"w": jnp.array([1.0, 0.01])}

def bad():
    return 3
"""


@pytest.fixture
def user_file(tmp_path):
    f = tmp_path / "prob.py"
    f.write_text(USER_PROBLEM)
    return f


def test_compare_user_problem_writes_outputs(tmp_path, user_file, capsys):
    out = tmp_path / "out"
    rc = main(["compare", "--problem", f"{user_file}:make", "--optimizer", "gd", "--learning-rate", "0.065",
               "--steps", "80", "--out", str(out), "--no-progress", "--probe-every", "20"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["optimizer"]["learning_rate"] == 0.065 and m["problem"] == f"{user_file}:make"
    assert "rod" in capsys.readouterr().out


def test_compare_inertial_models(tmp_path, user_file, capsys):
    out = tmp_path / "out"
    rc = main(["compare", "--problem", f"{user_file}:make", "--optimizer", "heavy_ball", "--learning-rate", "0.1",
               "--momentum", "0.9", "--steps", "60", "--start-step", "20", "--out", str(out), "--no-progress",
               "--probe-every", "20",
               "--models", "discrete,rod,inertial,inertial_stable"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert not m["inertial"]["failed"] and not m["inertial_stable"]["failed"]
    printed = capsys.readouterr().out
    assert "inertial_stable" in printed and "inertial " in printed


@pytest.mark.parametrize(
    "args, match",
    [
        (["--optimizer", "adamw"], "unknown optimizer 'adamw'"),
        (["--problem", "mlp-digit"], "unknown problem"),
        (["--learning-rate", "-1"], "learning_rate must be a positive"),
        (["--optimizer", "adam", "--b1", "1.2"], r"b1 must lie in \[0, 1\)"),
        (["--optimizer", "adam", "--eps", "-1"], "eps must be >= 0"),
        (["--optimizer", "gd", "--momentum", "0.9"], "takes no hyperparameter 'momentum'"),
        (["--problem", "does/not/exist.py:make", "--learning-rate", "0.1"], "does not exist"),
        (["--steps", "ten"], "invalid int value"),
        (["--models", "discrete,rodd"], "unknown model"),
        (["--optimizer", "rmsprop", "--models", "discrete,inertial"], "defined for the momentum methods"),
        (["--top-k", "0"], r"top-k must lie in 1\.\.\d+"),
        (["--problem", "toy", "--top-k", "3"], r"top-k must lie in 1\.\.2 \(the model has 2 parameters\), got 3"),
        (["--probe-every", "6"], r"probe-every must lie in 1\.\.5 \(the number of steps\), got 6"),
        (["--start-step", "soon"], "start step must be an integer"),
        (["--sharpness-method", "power"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, match, capsys):
    out = tmp_path / "out"
    rc = main(["compare", *args, "--out", str(out), "--steps", "5", "--no-progress"] if "--steps" not in args
              else ["compare", *args, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("rodflow: error:")
    assert pytest.importorskip("re").search(match, err), err
    assert not out.exists()


def test_bad_user_problem_function(tmp_path, user_file, capsys):
    out = tmp_path / "out"
    rc = main(["compare", "--problem", f"{user_file}:bad", "--learning-rate", "0.1", "--out", str(out)])
    assert rc == 2 and "expected (loss_fn, params0)" in capsys.readouterr().err
    assert not out.exists()


def test_no_traceback_from_the_real_entry_point(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rodflow_jax", "compare", "--optimizer", "nope", "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mlp-digits" in out and "scalar_nadam" in out


def test_compare_any_optax_optimizer(tmp_path, user_file):
    out = tmp_path / "ox"
    rc = main(["compare", "--problem", f"{user_file}:make", "--optimizer", "optax:adamw", "--opt-args",
               "learning_rate=0.02,weight_decay=1e-4,b1=0.5", "--steps", "40", "--out", str(out), "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["threshold_quantity"] == "edge ratio" and m["optimizer"]["weight_decay"] == 1e-4
    assert m["start_step"] == 20  # b1 = 0.5 from --opt-args sets the default start, as for adam
    assert m["rod"]["sharpness_ratio_final"] is not None


@pytest.mark.parametrize("args, match", [
    (["--optimizer", "optax:adamx", "--opt-args", "learning_rate=0.1"], "unknown optax optimizer"),
    (["--optimizer", "optax:adamw", "--opt-args", "learning_rate=0.1,bogus=1"], "bogus"),
    (["--optimizer", "optax:adamw"], "needs a learning rate"),
    (["--optimizer", "gd", "--opt-args", "learning_rate=0.1"], "--opt-args goes with"),
    # from the stop-43 QA pass: each was a traceback or a silent choice
    (["--optimizer", "optax:sgd", "--opt-args", "learning_rate=0.1,momentum=0.5,nesterov=maybe"],
     "nesterov='maybe' must be true or false"),
    (["--optimizer", "optax:adam", "--learning-rate", "0.1", "--opt-args", "learning_rate=0.2"],
     "learning_rate given twice: as --learning-rate and in --opt-args"),
    (["--seed", "99999999999999999999", "--optimizer", "gd", "--learning-rate", "0.1"], "a seed must lie in 0..4294967295"),
])
def test_bad_optax_input_is_one_line(tmp_path, user_file, args, match, capsys):
    rc = main(["compare", "--problem", f"{user_file}:make", *args, "--steps", "5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err, err


def test_repeated_seeds_and_float32_inputs_read_as_typed(capsys):
    """From a QA pass: ``--seeds 0,0`` ran the same rows twice, and ``--momentum -0.1`` was echoed
    back as -0.10000000149011612 (its float32 value)."""
    assert main(["sweep", "--problem", "toy", "--seeds", "0,2,0", "--steps", "20", "--no-progress"]) == 2
    assert capsys.readouterr().err == "rodflow: error: --seeds lists seed 0 more than once (the rows would repeat)\n"
    assert main(["compare", "--problem", "toy", "--optimizer", "heavy_ball", "--momentum", "-0.1", "--steps", "20",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == "rodflow: error: momentum must lie in [0, 1), got -0.1\n"


@pytest.mark.parametrize("args, match", [
    # a bool argument was swept as a traced float: TracerBoolConversionError inside optax
    (["--optimizer", "optax:sgd", "--opt-args", "learning_rate=0.05,momentum=0.9,nesterov=0;1"],
     "nesterov=0.0 must be true or false"),
    (["--optimizer", "optax:adamw", "--opt-args", "learning_rate=0.05,weight_decay=1e-3;nan"],
     "weight_decay: every value must be a finite number"),
    (["--learning-rate", "0.1,inf"], "--learning-rate: every value must be a finite number"),
    (["--seeds", "0,5000000000"], "a seed must lie in 0..4294967295, got 5000000000"),
    (["--learning-rate", "0.3,0.1,0.3"], "--learning-rate lists 0.3 more than once"),
    (["--learning-rate", "0.1:0.3:1"], "asks for 1 value between two different ends"),
])
def test_bad_sweep_input_is_one_line(tmp_path, args, match, capsys):
    out = tmp_path / "o"
    rc = main(["sweep", "--problem", "toy", *args, "--steps", "20", "--start-step", "0", "--models", "discrete",
               "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and match in err, err
    assert not out.exists()


def test_optax_bool_arguments_stay_bools_and_defaults_need_no_learning_rate(tmp_path, capsys):
    """``nesterov=true`` was recorded as 1.0; a factory whose ``learning_rate`` has a default
    (prodigy) or that has none (polyak_sgd) was told it 'needs a learning rate'."""
    out = tmp_path / "o"
    assert main(["compare", "--problem", "toy", "--optimizer", "optax:sgd", "--opt-args",
                 "learning_rate=0.1,momentum=0.5,nesterov=true", "--steps", "20", "--start-step", "0",
                 "--models", "discrete", "--no-progress", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["optimizer"]["nesterov"] is True
    from rodflow_jax.experiments._spec import _requires
    import optax
    assert _requires(optax.adam, "learning_rate")
    assert not _requires(optax.contrib.prodigy, "learning_rate") and not _requires(optax.polyak_sgd, "learning_rate")


def test_half_precision_parameters_are_refused_up_front():
    """bfloat16 parameters ran the discrete run, then failed in the probe's eigensolver with a
    NotImplementedError traceback (float32 runs; under --float64 a problem file's leaves are widened)."""
    import jax.numpy as jnp

    from rodflow_jax import InputError, compare, make_optimizer

    def loss(p):
        return jnp.sum(jnp.asarray(p, jnp.float32) ** 2)

    for dtype in (jnp.bfloat16, jnp.float16):
        with pytest.raises(InputError, match=f"parameters must be float32 or float64, got {jnp.dtype(dtype).name}"):
            compare(loss, jnp.ones(3, dtype), make_optimizer("gd", learning_rate=0.1), 10, start_step=0,
                    progress=False)


def test_a_problem_file_imports_the_modules_beside_it(tmp_path):
    """As ``python file.py`` would: a problem file's folder is importable from it."""
    (tmp_path / "shared_model.py").write_text("import jax.numpy as jnp\nW = jnp.ones(3)\n")
    (tmp_path / "prob.py").write_text("import jax.numpy as jnp\nfrom shared_model import W\n"
                                      "def make():\n    return (lambda p: jnp.sum((p - W) ** 2)), jnp.zeros(3)\n")
    out = tmp_path / "o"
    assert main(["compare", "--problem", f"{tmp_path / 'prob.py'}:make", "--learning-rate", "0.1", "--steps", "10",
                 "--start-step", "0", "--models", "discrete", "--no-progress", "--out", str(out)]) == 0
