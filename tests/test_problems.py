"""The problem registry and the user-problem loader."""

from __future__ import annotations

import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from rodflow_jax._errors import InputError
from rodflow_jax.problems import (
    PROBLEMS,
    Problem,
    get_problem,
    list_problems,
    load_user_problem,
)
from rodflow_jax.problems._quadratic import quadratic
from conftest import ALL_OPTIMIZERS

OPTIMIZER_NAMES = set(ALL_OPTIMIZERS)
EXPECTED = {"quadratic", "toy", "deep-linear", "mlp-digits", "mlp-digits-ce", "cnn-digits", "transformer-sort"}


def _flat(params):
    return np.asarray(ravel_pytree(params)[0])


def test_registry_names_and_listing():
    assert EXPECTED <= set(PROBLEMS)
    assert [p.name for p in list_problems()] == list(PROBLEMS)
    for name, problem in PROBLEMS.items():
        assert isinstance(problem, Problem)
        assert problem.name == name
        assert problem.description and "\n" not in problem.description
        assert problem.default_steps > 0


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_problem_builds(name):
    problem = get_problem(name)
    loss_fn, params0 = problem.make(0)
    for leaf in jax.tree_util.tree_leaves(params0):
        assert jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating)
    loss, grad = jax.jit(jax.value_and_grad(loss_fn))(params0)
    assert jnp.shape(loss) == ()
    assert math.isfinite(float(loss))
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(params0)
    for g, p in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(params0)):
        assert g.shape == jnp.shape(p)
        assert bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_learning_rates_and_hyperparameters(name):
    problem = get_problem(name)
    assert set(problem.learning_rates) == OPTIMIZER_NAMES
    assert all(lr > 0 for lr in problem.learning_rates.values())
    assert set(problem.hyperparameters) <= OPTIMIZER_NAMES
    assert problem.hyperparameters["heavy_ball"] == {"momentum": 0.5}
    assert problem.hyperparameters["nesterov"] == {"momentum": 0.5}


@pytest.mark.parametrize("name", sorted(EXPECTED - {"quadratic"}))
def test_seeds_give_different_params(name):
    make = get_problem(name).make
    a, b = _flat(make(0)[1]), _flat(make(1)[1])
    assert a.shape == b.shape
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(a, _flat(make(0)[1]))  # deterministic


def test_parameter_counts():
    counts = {name: _flat(get_problem(name).make(0)[1]).size for name in EXPECTED}
    assert counts["quadratic"] == 10
    assert counts["toy"] == 2
    assert counts["deep-linear"] == 160
    assert counts["mlp-digits"] == counts["mlp-digits-ce"] == 2410
    assert counts["cnn-digits"] < 5000
    assert counts["transformer-sort"] < 5000


def test_quadratic_factory():
    loss_fn, params0 = quadratic(jnp.array([1.0, 4.0]), w0=jnp.array([1.0, 1.0]))
    assert float(loss_fn(params0)) == pytest.approx(2.5)
    hess = jax.hessian(lambda w: loss_fn({"w": w}))(params0["w"])
    np.testing.assert_allclose(hess, np.diag([1.0, 4.0]))
    _, p = quadratic([0.5, 2.0, 3.0])
    np.testing.assert_array_equal(p["w"], np.ones(3))


def test_quadratic_default_lr_is_below_threshold():
    problem = get_problem("quadratic")
    loss_fn, params0 = problem.make(0)
    lam = float(jnp.max(jnp.diag(jax.hessian(lambda w: loss_fn({"w": w}))(params0["w"]))))
    assert lam == pytest.approx(10.0, rel=1e-5)
    assert lam * problem.learning_rates["gd"] / 2 == pytest.approx(0.9)


def test_unknown_problem_suggests():
    with pytest.raises(InputError, match=r"did you mean 'mlp-digits'.*quadratic"):
        get_problem("mlp-digit")
    with pytest.raises(InputError, match="choose one of"):
        get_problem("zzz")


# --------------------------------------------------------------------------- user problems


def _write(tmp_path, body, name="prob.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


GOOD = """
    import jax
    import jax.numpy as jnp

    def make(seed):
        w = jax.random.normal(jax.random.PRNGKey(seed), (3,))
        return (lambda p: jnp.sum(p["w"] ** 2)), {"w": w}

    def make_noseed():
        return (lambda p: jnp.sum(p ** 2)), jnp.ones(2)

    NOT_A_FUNCTION = 3

    def make_list(seed):
        return [lambda p: p, 1.0]

    def make_vector(seed):
        return (lambda p: p * 2.0), jnp.ones(3)

    def make_int_params(seed):
        return (lambda p: jnp.sum(p)), jnp.arange(3)

    def make_raises(seed):
        raise RuntimeError("boom")

    def make_loss_raises(seed):
        def loss(p):
            raise KeyError("w")
        return loss, jnp.ones(2)

    def make_two(seed, width):
        return (lambda p: jnp.sum(p ** 2)), jnp.ones(width)

    def make_kw(seed=0, *, width=2):
        return (lambda p: jnp.sum(p ** 2)), jnp.ones(width)
"""


def test_user_problem_good(tmp_path):
    path = _write(tmp_path, GOOD)
    loss_fn, params0 = load_user_problem(path, seed=1)
    assert params0["w"].shape == (3,)
    assert jnp.shape(loss_fn(params0)) == ()
    _, other = load_user_problem(f"{path}:make", seed=2)
    assert not np.allclose(params0["w"], other["w"])
    loss_fn, params0 = load_user_problem(f"{path}:make_noseed")
    assert float(loss_fn(params0)) == pytest.approx(2.0)
    _, params0 = load_user_problem(f"{path}:make_kw")  # defaults and keywords are the file's to set
    assert params0.shape == (2,)


@pytest.mark.parametrize(
    "suffix, match",
    [
        (":missing", r"defines no function 'missing'"),
        (":NOT_A_FUNCTION", r"NOT_A_FUNCTION is not callable \(got int\)"),
        (":make_list", r"make_list returned list, expected \(loss_fn, params0\)"),
        (":make_vector", r"must return a scalar, got shape \(3,\)"),
        (":make_int_params", r"no floating-point array leaves \(found int(32|64) array\)"),
        (":make_raises", r"error while running .*make_raises: RuntimeError: boom"),
        (":make_loss_raises", r"error while running loss_fn of .*KeyError"),
        (":make_two", r"make_two must be callable as make\(seed\) or make\(\) .*its signature is make_two\(seed, width\)"),
    ],
)
def test_user_problem_errors(tmp_path, suffix, match):
    path = _write(tmp_path, GOOD)
    with pytest.raises(InputError, match=match):
        load_user_problem(path + suffix)


def test_user_problem_missing_file(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(InputError, match=r"problem file '.*nope.py' does not exist"):
        load_user_problem(f"{missing}:make")


def test_user_problem_import_error(tmp_path):
    path = _write(tmp_path, "import not_a_module_xyz\n", name="bad.py")
    with pytest.raises(InputError, match=r"error while importing .*bad.py: ModuleNotFoundError"):
        load_user_problem(path)


def test_user_problem_default_function_missing(tmp_path):
    path = _write(tmp_path, "def other(seed):\n    return None\n", name="nomake.py")
    with pytest.raises(InputError, match=r"defines no function 'make'"):
        load_user_problem(path)


@pytest.mark.parametrize("c_in,c_out,size", [(1, 8, 8), (3, 5, 4)])
def test_cnn_patch_matmul_conv_is_the_library_convolution(c_in, c_out, size):
    from rodflow_jax.problems._digits import _conv

    kx, kw, kb = jax.random.split(jax.random.PRNGKey(7), 3)
    x = jax.random.normal(kx, (2, size, size, c_in))
    w = jax.random.normal(kw, (3, 3, c_in, c_out))  # not symmetric: a transposed kernel fails
    b = jax.random.normal(kb, (c_out,))
    ref = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    np.testing.assert_allclose(_conv(x, w, b), ref, rtol=1e-12, atol=1e-12)


def test_user_problem_is_widened_to_float64_under_x64(tmp_path):
    """``--float64`` enables x64; a file problem that builds float32 arrays must then run in float64
    too (it used to stay float32, so --float64 changed nothing for it). Integer leaves are kept.
    The suite runs with x64 enabled, as the CLI does under --float64."""
    path = _write(tmp_path, """
        import jax.numpy as jnp

        def make(seed):
            x = jnp.linspace(0.0, 1.0, 7, dtype=jnp.float32)
            p = {"w": jnp.ones(3, jnp.float32), "b": jnp.zeros((), jnp.float16), "n": jnp.arange(2)}
            return (lambda p: jnp.sum((x[:3] * p["w"] - p["b"]) ** 2) + 0.0 * p["n"].sum()), p
        """)
    loss_fn, params0 = load_user_problem(path, seed=0)
    assert params0["w"].dtype == jnp.float64 and params0["b"].dtype == jnp.float64
    assert jnp.issubdtype(params0["n"].dtype, jnp.integer)
    assert loss_fn(params0).dtype == jnp.float64
