import jax
import jax.numpy as jnp
import numpy as np

import rodflow_jax as rf
from rodflow_jax._discrete import run_discrete
from helpers import tiny_mlp


def test_divergence_is_recorded_not_raised():
    loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 50.0]) * w**2)  # noqa: E731
    run = run_discrete(rf.make_optimizer("gd", learning_rate=1.0), loss, jnp.ones(2), 400, chunk_size=32)
    assert run.diverged
    # |w_2| grows 49x per step: L(z_2) = 1.4e8 passes 1e6 (1 + L(z_0)) = 2.7e7 (overflow would be k = 91)
    assert run.diverged_at == 2
    assert np.all(np.isnan(run.loss[run.diverged_at :]))
    assert np.all(np.isfinite(run.loss[: run.diverged_at]))


def test_sparse_saving_matches_dense():
    loss, params = tiny_mlp()
    opt = rf.make_optimizer("adam", learning_rate=0.01)
    dense = run_discrete(opt, loss, params, 50, chunk_size=16)
    sparse = run_discrete(opt, loss, params, 50, save_steps=[0, 7, 8, 50], chunk_size=16)
    np.testing.assert_array_equal(sparse.saved_steps, [0, 7, 8, 50])
    np.testing.assert_allclose(dense.loss, sparse.loss)
    for k in (7, 50):
        a, b = dense.state_at(k), sparse.state_at(k)
        np.testing.assert_allclose(np.asarray(a[0].params["out"]), np.asarray(b[0].params["out"]))
        np.testing.assert_allclose(np.asarray(a[1].nu["out"]), np.asarray(b[1].nu["out"]))
    assert len(dense.loss) == 51 and not dense.diverged


def test_drift_free_amplitude_of_a_period_two_orbit_with_drift():
    """GD at eta * lambda = 2 on x bounces x_k = (-1)^k x_0; a linear term in y drifts y by eta c per
    step. The half step counts the drift, the drift-free amplitude removes it exactly."""
    eta, x0, c = 0.5, 0.3, 0.2
    loss = lambda w: 0.5 * (2.0 / eta) * w[0] ** 2 + c * w[1]  # noqa: E731
    run = run_discrete(rf.make_optimizer("gd", learning_rate=eta), loss, jnp.array([x0, 0.0]), 20)
    np.testing.assert_allclose(run.amplitude[1:], x0, rtol=1e-12)
    np.testing.assert_allclose(run.half, np.hypot(x0, eta * c / 2), rtol=1e-12)
    assert np.isnan(run.amplitude[0])


def test_a_diverging_configuration_is_frozen_and_spreads_nothing():
    from rodflow_jax.experiments import rollout_batch, stack_trees

    loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 50.0]) * w**2)  # noqa: E731
    opts = stack_trees([rf.make_optimizer("gd", learning_rate=lr) for lr in (0.01, 1.0)])
    r = rollout_batch(opts, stack_trees([jnp.ones(2)] * 2), loss, 30, [30])
    assert list(r.diverged_at) == [-1, 2]
    assert np.all(np.isfinite(r.loss[0])) and np.all(np.isnan(r.loss[1, 2:]))
    phase, _ = r.saved
    assert np.all(np.isfinite(phase.params[1]))  # frozen at its last finite state


def test_stack_trees_stacks_on_the_host_with_the_leaves_dtypes():
    """Concrete leaves are stacked with numpy (``jnp.stack`` of B arrays compiled for 9.5 s at
    B = 8,192, stop 43), to the same values and dtypes; a schedule leaf is shared; tracers still stack."""
    from rodflow_jax.experiments import stack_trees

    sched = lambda c: 0.1  # noqa: E731
    trees = [{"w": jnp.full((2, 3), float(i), jnp.float32), "lr": 0.1 * i, "s": sched} for i in range(5)]
    out = stack_trees(trees)
    assert out["w"].shape == (5, 2, 3) and out["w"].dtype == jnp.float32 and out["s"] is sched
    np.testing.assert_array_equal(np.asarray(out["w"]), np.stack([np.asarray(t["w"]) for t in trees]))
    assert out["lr"].dtype == jnp.result_type(0.1) and np.allclose(np.asarray(out["lr"]), [0.1 * i for i in range(5)])
    traced = jax.jit(lambda a, b: stack_trees([a, b]))(jnp.ones(3), jnp.zeros(3))
    np.testing.assert_array_equal(np.asarray(traced), [[1.0] * 3, [0.0] * 3])
