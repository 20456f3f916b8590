import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rodflow_jax as rf
from helpers import tiny_mlp


def _quadratic_with(spectrum, seed=0):
    """0.5 x^T Q diag(spectrum) Q^T x with a random rotation Q, as a two-leaf pytree."""
    n = len(spectrum)
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(seed), (n, n)))
    h = q @ jnp.diag(jnp.asarray(spectrum)) @ q.T

    def loss(p):
        x = jnp.concatenate([p["a"], p["b"].ravel()])
        return 0.5 * x @ h @ x + jnp.sum(jnp.sin(x)) * 0  # exact quadratic

    m = n // 2
    params = {"a": jnp.ones(m), "b": jnp.ones((n - m,))}
    return loss, params


def _dense_top(loss, params, k, precond=None):
    from jax.flatten_util import ravel_pytree

    x, unravel = ravel_pytree(params)
    h = np.asarray(jax.hessian(lambda v: loss(unravel(v)))(x))
    if precond is not None:
        p = np.broadcast_to(np.asarray(ravel_pytree(precond)[0]), x.shape)
        h = h / np.sqrt(p)[:, None] / np.sqrt(p)[None, :]
    return np.sort(np.linalg.eigvalsh(h))[::-1][:k]


rng = np.random.default_rng(0)
PROBLEMS = {
    "mlp": lambda: tiny_mlp(n=60, d=8, h=10, o=4),  # 134 parameters
    "near_degenerate": lambda: _quadratic_with(np.concatenate([[10.0, 10.0 - 1e-4, 9.9], rng.uniform(-1, 5, 117)])),
    "large_negative": lambda: _quadratic_with(np.concatenate([[3.0, 2.5, 2.0], rng.uniform(-1, 1, 100), [-50.0, -40.0]])),
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("k", [1, 3])
def test_lanczos_matches_dense(problem, k):
    loss, params = PROBLEMS[problem]()
    ref = _dense_top(loss, params, k)
    got = np.asarray(rf.top_eigenvalues(loss, params, k, method="lanczos", num_iter=100))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    dense = np.asarray(rf.top_eigenvalues(loss, params, k, method="dense"))
    np.testing.assert_allclose(dense, ref, rtol=1e-10)


def test_largest_algebraic_not_magnitude():
    loss, params = PROBLEMS["large_negative"]()
    top = float(rf.top_eigenvalues(loss, params, 1, method="lanczos", num_iter=100)[0])
    assert top == pytest.approx(3.0, rel=1e-8)


@pytest.mark.parametrize("method", ["dense", "lanczos"])
@pytest.mark.parametrize("scalar", [False, True])
def test_preconditioned_matches_dense(method, scalar):
    loss, params = PROBLEMS["mlp"]()
    precond = jnp.asarray(0.37) if scalar else jax.tree.map(lambda x: 0.1 + jnp.abs(jnp.sin(3 * x)), params)
    ref = _dense_top(loss, params, 2, precond)
    got = np.asarray(rf.top_eigenvalues(loss, params, 2, method=method, preconditioner=precond, num_iter=134))
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_eigenvectors_are_eigenvectors():
    loss, params = PROBLEMS["near_degenerate"]()
    vals, vecs = rf.top_eigenpairs(loss, params, 2, method="lanczos", num_iter=100)
    assert jax.tree.structure(jax.tree.map(lambda x: x[0], vecs)) == jax.tree.structure(params)
    hvp = rf.hessian_vector_product(loss, params)
    for i in range(2):
        v = jax.tree.map(lambda x: x[i], vecs)
        hv = hvp(v)
        for a, b in zip(jax.tree.leaves(hv), jax.tree.leaves(v)):
            np.testing.assert_allclose(a, vals[i] * b, atol=1e-6)


def test_warm_start_converges_in_fewer_iterations():
    loss, params = PROBLEMS["mlp"]()
    ref = _dense_top(loss, params, 1)[0]
    _, vecs = rf.top_eigenpairs(loss, params, 1, method="dense")
    from jax.flatten_util import ravel_pytree

    v0 = ravel_pytree(jax.tree.map(lambda x: x[0], vecs))[0]
    perturbed = jax.tree.map(lambda x: x * 1.01, params)  # the next probe along a trajectory
    ref2 = _dense_top(loss, perturbed, 1)[0]
    cold = float(rf.top_eigenvalues(loss, perturbed, 1, method="lanczos", num_iter=6)[0])
    warm = float(rf.top_eigenvalues(loss, perturbed, 1, method="lanczos", num_iter=6, v0=v0)[0])
    assert abs(warm - ref2) / ref2 < abs(cold - ref2) / ref2
    assert abs(warm - ref2) / ref2 < 1e-4 and ref != ref2


def test_probe_works_under_vmap():
    loss, params = tiny_mlp()
    batch = jax.tree.map(lambda x: jnp.stack([x, 1.1 * x]), params)
    for method in ("dense", "lanczos"):
        out = jax.vmap(lambda p: rf.top_eigenvalues(loss, p, 1, method=method, num_iter=54))(batch)
        ref = [_dense_top(loss, jax.tree.map(lambda x: x[i], batch), 1)[0] for i in range(2)]
        np.testing.assert_allclose(np.asarray(out)[:, 0], ref, rtol=1e-6)


def test_optimizer_sharpness_uses_the_step_preconditioner():
    """lambda_max(P^-1 H) with P from the updated, bias-corrected nu, as the Adam step uses it."""
    loss, params = tiny_mlp()
    opt = rf.make_optimizer("adam", learning_rate=1e-2)
    phase, slow = opt.init(params)
    for _ in range(3):
        phase, slow = opt.step(phase, slow, jax.grad(loss)(phase.params))
    ev, thr, _ = rf.optimizer_sharpness(opt, loss, phase.params, slow, method="dense")
    g = jax.grad(loss)(phase.params)
    nu = jax.tree.map(lambda v, gi: 0.999 * v + 0.001 * gi**2, slow.nu, g)
    p = jax.tree.map(lambda v: jnp.sqrt(v / (1 - 0.999**4)) + 1e-8, nu)
    np.testing.assert_allclose(float(ev[0]), _dense_top(loss, phase.params, 1, p)[0], rtol=1e-10)
    assert float(thr) == pytest.approx(2 * 1.9 * (1 - 0.9**4) / (0.1 * 1e-2))


def test_unknown_method():
    loss, params = tiny_mlp()
    with pytest.raises(rf.InputError, match="unknown sharpness method"):
        rf.top_eigenvalues(loss, params, 1, method="power")


def test_bad_preconditioner_and_k_are_refused():
    """From the stop-43 API QA pass: a preconditioner dict with one of two keys was broadcast over
    every parameter (a wrong answer, silently), a zero one gave NaN, and k outside 1..n was
    clamped or, for k = -1, returned n - 1 values."""
    import rodflow_jax as rf
    from rodflow_jax import InputError

    loss_fn, params0 = rf.get_problem("toy").make(0)
    for bad, match in [({"x": 2.0}, "shaped like params"), ([2.0, 3.0], "shaped like params"),
                       (0.0, "positive everywhere"), ({"x": 1.0, "y": -1.0}, "positive everywhere")]:
        with pytest.raises(InputError, match=match):
            rf.top_eigenvalues(loss_fn, params0, preconditioner=bad)
    for k in (0, -1, 3):
        with pytest.raises(InputError, match=r"k must lie in 1\.\.2"):
            rf.top_eigenvalues(loss_fn, params0, k=k)
    with pytest.raises(InputError, match="at most 1 eigenvalues"):
        rf.top_eigenvalues(loss_fn, params0, k=2, method="lanczos", num_iter=1)
    both = rf.top_eigenvalues(loss_fn, params0, preconditioner={"x": 2.0, "y": 2.0})
    np.testing.assert_allclose(both, rf.top_eigenvalues(loss_fn, params0, preconditioner=2.0), rtol=1e-12)
