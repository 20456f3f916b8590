"""Nothing a user has is lost: the output policy, failures mid-run, signals, quiet logs."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import rodflow_jax as rf
from rodflow_jax.cli import main

QUAD = """
import jax.numpy as jnp

def make(seed=0):
    def loss(p):
        return 0.5 * jnp.sum(p["w"] ** 2 * jnp.array([1.0, 30.0])) + 0.1 * jnp.sum(p["w"] ** 4)
    return loss, {"w": jnp.array([1.0, 0.3])}

def nan_later(seed=0):
    # finite at the start, NaN once |w|^2 < 0.05 (GD shrinks it)
    def loss(w):
        return jnp.sqrt(jnp.sum(w ** 2) - 0.05)
    return loss, jnp.array([0.6, 0.4])
"""
FILES = {"metrics.json", "timings.json", "trajectories.npz", "loss.png", "sharpness.png", "param_error.png",
         "summary.png"}


@pytest.fixture
def prob(tmp_path):
    f = tmp_path / "quad.py"
    f.write_text(QUAD)
    return f


def _compare(prob, out, *extra):
    return main(["compare", "--problem", f"{prob}:make", "--learning-rate", "0.06", "--steps", "30",
                 "--no-progress", "--out", str(out), *extra])


def _one_error_line(capsys, match):
    err = capsys.readouterr().err.strip()
    assert err.startswith("rodflow: error:") and len(err.splitlines()) == 1, err
    assert match in err, err


def test_existing_folder_refused_then_replaced_with_overwrite(tmp_path, prob, capsys):
    out = tmp_path / "run"
    out.mkdir(mode=0o755)
    (out / "mine.txt").write_text("keep me")
    assert _compare(prob, out) == 2
    _one_error_line(capsys, "--overwrite")
    assert (out / "mine.txt").read_text() == "keep me"
    assert _compare(prob, out, "--overwrite") == 0
    assert {p.name for p in out.iterdir()} == FILES
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~_umask()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_existing_file_is_never_touched(tmp_path, prob, capsys):
    f = tmp_path / "results"
    f.write_text("precious")
    for extra in ((), ("--overwrite",)):
        assert _compare(prob, f, *extra) == 2
        _one_error_line(capsys, "existing file")
        assert f.read_text() == "precious"


def test_parent_is_a_file(tmp_path, prob, capsys):
    (tmp_path / "afile").write_text("x")
    assert _compare(prob, tmp_path / "afile" / "run") == 2
    _one_error_line(capsys, "is a file")


def test_unwritable_parent_fails_before_compute(tmp_path, prob, capsys):
    t = time.perf_counter()
    assert _compare(prob, Path("/proc/rodflow-no/run")) == 2
    _one_error_line(capsys, "cannot write")
    assert time.perf_counter() - t < 5  # refused before any compile


def test_out_dot_in_an_empty_folder_and_a_full_one(tmp_path, prob, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert _compare(prob, ".") == 0
    assert {p.name for p in empty.iterdir()} == FILES
    assert _compare(prob, ".", "--overwrite") == 2  # never replaces the current folder
    _one_error_line(capsys, "current folder")


def test_loss_turning_nan_mid_run_is_a_result(tmp_path, prob, capsys):
    out = tmp_path / "run"
    rc = main(["compare", "--problem", f"{prob}:nan_later", "--learning-rate", "0.1", "--steps", "60",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["discrete"]["diverged"] and m["discrete"]["final_loss"] is None
    k = m["discrete"]["diverged_at"]
    for flow in ("stable", "rod"):
        assert m[flow]["failed"] or f"stopped at step {k}" in m[flow]["message"]
    assert "diverged at step" in capsys.readouterr().out


def test_identical_runs_write_identical_metrics(tmp_path, prob):
    assert _compare(prob, tmp_path / "a") == 0 and _compare(prob, tmp_path / "b") == 0
    for name in ("metrics.json", "trajectories.npz"):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b, name


def test_equinox_module_as_parameters():
    model = eqx.nn.MLP(3, 1, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (20, 3))
    y = jnp.sin(x[:, :1])

    def loss(m):
        return jnp.mean((jax.vmap(m)(x) - y) ** 2)

    r = rf.compare(loss, model, rf.make_optimizer("gd", learning_rate=0.5), 20, probe_every=10)
    assert r.metrics["num_params"] == sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    assert r.metrics["discrete"]["final_loss"] < float(loss(model))


def _cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "rodflow_jax", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "MPLBACKEND": "Agg"}, **kw)


LONG = ["compare", "--problem", "mlp-digits", "--steps", "3000", "--sharpness-method", "dense"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_run_stops_fast_and_leaves_nothing(tmp_path, sig, code):
    out = tmp_path / "run"
    p = _cli([*LONG, "--out", str(out)])
    time.sleep(12)  # past start-up, into compilation or the discrete scan
    assert p.poll() is None
    t = time.perf_counter()
    p.send_signal(sig)
    p.wait(timeout=10)
    assert time.perf_counter() - t < 2.0
    assert p.returncode == code
    err = p.stderr.read()
    assert "Traceback" not in err and "interrupted" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("delay", [0.3, 1.0])
def test_a_ctrl_c_while_jax_is_still_importing_is_one_line(tmp_path, delay):
    """The console script's module (``rodflow_cli``) handles SIGINT before it imports JAX: a
    Ctrl-C in the first 2 s used to be a KeyboardInterrupt or ImportError traceback, or was
    swallowed by a garbage-collection callback and the run went on to write its folder."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "rodflow_cli", "compare", "--problem", "toy", "--steps", "100",
                          "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "MPLBACKEND": "Agg"})
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err == "rodflow: interrupted by SIGINT; nothing was written\n"
    assert not out.exists()


@pytest.mark.slow
def test_sigkill_while_writing_keeps_the_previous_folder(tmp_path, prob):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}')
    env = {**os.environ, "MPLBACKEND": "Agg", "RODFLOW_TEST_PAUSE_BEFORE_SWAP": "30"}
    p = subprocess.Popen([sys.executable, "-m", "rodflow_jax", "compare", "--problem", f"{prob}:make",
                          "--learning-rate", "0.06", "--steps", "30", "--no-progress", "--overwrite",
                          "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".run.tmp-*/summary.png")) and time.time() < deadline:
        time.sleep(0.2)
    p.kill()
    p.wait()
    assert json.loads((out / "metrics.json").read_text()) == {"old": True}
    # the next run cleans the dead run's temporary folder and replaces the old one
    assert _compare(prob, out, "--overwrite") == 0
    assert [q.name for q in tmp_path.iterdir()] == ["run", "quad.py"] or sorted(q.name for q in tmp_path.iterdir()) == [
        "quad.py", "run"]


def test_logs_get_no_carriage_returns(tmp_path, prob):
    p = _cli(["compare", "--problem", f"{prob}:make", "--learning-rate", "0.06", "--steps", "30",
              "--out", str(tmp_path / "r")])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "\r" not in err
    assert "discrete:" in err  # one summary line per phase instead


# --- property: every numeric/path input ends in "exit 0 and complete outputs" or "exit 2, one line, nothing" ---
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from(["x", "", "1e400"]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lr=numbers, steps=st.sampled_from(["-1", "0", "1", "2", "12", "x"]),
       start=st.sampled_from(["auto", "0", "5", "-3", "99", "s"]),
       out=st.sampled_from(["new", "file", "full", "afile/sub", ""]))
@example(lr=0.06, steps="12", start="auto", out="new")
@example(lr=50.0, steps="12", start="0", out="new")  # diverges: still exit 0 and complete
@example(lr=0.06, steps="12", start="auto", out="")  # an empty --out is an error, not the default folder
def test_property_exit_0_complete_or_exit_2_nothing(tmp_path_factory, prob, lr, steps, start, out):
    base = tmp_path_factory.mktemp("p")
    (base / "file").write_text("f")
    (base / "afile").write_text("f")
    (base / "full").mkdir()
    (base / "full" / "x").write_text("x")
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    argv = ["compare", "--problem", f"{prob}:make", f"--learning-rate={lr}", "--steps", steps,
            "--start-step", start, "--no-progress", "--probe-every", "4", "--out", str(base / out) if out else ""]
    rc = main(argv)
    after = {p: p.read_bytes() for p in base.rglob("*") if p.is_file()}
    assert rc in (0, 2)
    if rc == 0:
        assert {p.name for p in (base / out).iterdir()} == FILES
    else:
        assert not (base / "new").exists() and not list(base.glob(".*"))
    for p, content in before.items():
        assert after.get(p) == content
