import jax.numpy as jnp
import numpy as np

import rodflow_jax as rf
from rodflow_jax._discrete import run_discrete
from helpers import tiny_mlp


def test_divergence_is_recorded_not_raised():
    loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 50.0]) * w**2)  # noqa: E731
    run = run_discrete(rf.make_optimizer("gd", learning_rate=1.0), loss, jnp.ones(2), 400, chunk_size=32)
    assert run.diverged
    # |w_2| grows 49x per step, so the loss 25 * 49^(2k) overflows float64 at k = 91
    assert run.diverged_at == 91
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
