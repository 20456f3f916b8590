"""The generic edge probe against the analytic thresholds, closed forms, and from_optax."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rodflow_jax import make_optimizer, run_discrete
from rodflow_jax._edge import edge_probe
from rodflow_jax._sharpness import optimizer_sharpness
from rodflow_jax.optimizers._optax import from_optax

from helpers import lr_for, tiny_mlp

K = 30  # a state past the Adam-type transient's first steps, with bias corrections still active
probe = eqx.filter_jit(edge_probe)


def _make(name, lr=None):
    return make_optimizer(name, learning_rate=lr_for(name) if lr is None else lr)


def _state(opt, loss, params, k=K):
    return run_discrete(opt, loss, params, k).state_at(k)


def test_matches_analytic_ratio(optimizer_name):
    """sharpness / threshold of the nine built-ins (dense eigensolve) = the generic edge ratio."""
    loss, params = tiny_mlp()
    opt = _make(optimizer_name)
    z, s = _state(opt, loss, params)
    e = probe(opt, loss, z, s)
    sp = optimizer_sharpness(opt, loss, z.params, s, method="dense")
    analytic = float(sp.eigenvalues[0] / sp.threshold)
    assert float(e.ratio) == pytest.approx(analytic, rel=1e-8)
    assert float(e.residual) < 1e-6


def _quadratic(eigs, seed=0):
    d = len(eigs)
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(seed), (d, d)))
    h = q @ jnp.diag(jnp.asarray(eigs)) @ q.T
    return (lambda w: 0.5 * w @ h @ w), q


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gd", lambda eta, b, lam: eta * lam / 2),
        ("heavy_ball", lambda eta, b, lam: eta * lam / (2 + 2 * b)),
        ("nesterov", lambda eta, b, lam: eta * lam * (1 + 2 * b) / (2 + 2 * b)),
    ],
)
def test_quadratic_closed_form(name, expected):
    """A rotated quadratic whose most negative eigenvalue is larger in size than the top one:
    the edge is set by the largest *algebraic* eigenvalue."""
    eigs = [-9.0, 0.3, 1.0, 4.0, 6.0]
    loss, q = _quadratic(eigs)
    eta, beta = 0.1, 0.7
    opt = make_optimizer(name, learning_rate=eta) if name == "gd" else make_optimizer(
        name, learning_rate=eta, momentum=beta)
    z, s = opt.init(jnp.linspace(-1.0, 1.0, 5))
    e = probe(opt, loss, z, s)
    assert float(e.ratio) == pytest.approx(expected(eta, beta, 6.0), rel=1e-12)
    assert abs(float(jnp.dot(e.vector, q[:, -1]))) == pytest.approx(1.0, rel=1e-10)  # the top eigenvector


def test_adam_on_a_quadratic_with_a_given_second_moment():
    """Adam, P frozen: ratio = lambda_max(P^-1 H) eta (a (1-b1) + c (1+b1)) / (2 (1+b1))."""
    loss, _ = _quadratic([0.5, 2.0, 3.0])
    opt = make_optimizer("adam", learning_rate=0.02)
    w = jnp.array([0.3, -0.2, 0.5])
    z, s = opt.init(w)
    t = 5.0
    s = s._replace(count=jnp.asarray(t - 1.0), nu=jnp.array([0.2, 1.0, 3.0]))
    h = jax.hessian(loss)(w)
    g = h @ w
    nu = 0.999 * s.nu + 0.001 * g**2
    p = np.sqrt(nu / (1 - 0.999**t)) + 1e-8
    lam = np.max(np.linalg.eigvals(np.asarray(h) / p[:, None]).real)
    a = 1 / (1 - 0.9**t)
    expected = lam * 0.02 * a * 0.1 / (2 * 1.9)
    assert float(probe(opt, loss, z, s).ratio) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name, tx", [("adam", optax.adam(0.01)),
                                      ("nesterov", optax.sgd(0.1, 0.9, nesterov=True))])
def test_from_optax_gives_the_builtin_ratio(name, tx):
    """With ``new_slow`` honoured, "slow state frozen" means the same for a wrapped optax
    transformation (P held fixed); ignoring it lets the current gradient feed P, which is the
    built-in's ``include_slow_feedback=True`` linearisation."""
    loss, params = tiny_mlp()
    builtin = _make(name)
    z, s = _state(builtin, loss, params)
    ours = from_optax(tx)
    q, t = _state(ours, loss, params)
    frozen = float(probe(builtin, loss, z, s).ratio)
    assert float(probe(ours, loss, q, t).ratio) == pytest.approx(frozen, rel=1e-10)
    fed = float(probe(builtin, loss, z, s, include_slow_feedback=True).ratio)
    naive = from_optax(tx, honour_new_slow=False)
    assert float(probe(naive, loss, q, t).ratio) == pytest.approx(fed, rel=1e-10)
    if name != "nesterov":  # the adaptive methods: the feedback lowers the ratio by O(1/t) here
        assert 1e-4 < 1 - fed / frozen < 0.05


@pytest.mark.slow
def test_optax_only_probes():
    loss, params = tiny_mlp()
    for tx in (optax.adamw(0.01, weight_decay=1e-2),
               optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.warmup_cosine_decay_schedule(
                   0.0, 0.02, 10, 80), weight_decay=1e-2))):
        opt = from_optax(tx)
        e = probe(opt, loss, *_state(opt, loss, params))
        assert 0 < float(e.ratio) < 10 and float(e.residual) < 1e-6
    lion = from_optax(optax.lion(1e-3))  # sign updates: no linear instability
    assert float(probe(lion, loss, *_state(lion, loss, params)).ratio) == 0.0


def test_vmap_over_learning_rates_and_warm_start():
    loss, params = tiny_mlp()
    opt = _make("gd")
    z, s = _state(opt, loss, params, 5)
    lrs = jnp.array([0.1, 0.2, 0.4])
    ratios = jax.vmap(lambda lr: edge_probe(make_optimizer("gd", learning_rate=lr), loss, z, s).ratio)(lrs)
    np.testing.assert_allclose(np.asarray(ratios) / np.asarray(lrs), float(ratios[0]) / 0.1, rtol=1e-10)
    first = probe(opt, loss, z, s)
    warm = probe(opt, loss, z, s, num_iter=4, v0=first.vector)
    assert float(warm.ratio) == pytest.approx(float(first.ratio), rel=1e-5)


def _dead_input_problem():
    """A tanh network whose first input is always 0: its weights get zero gradients, nu stays 0."""
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(k[0], (30, 4)).at[:, 0].set(0.0)
    y = jax.random.normal(k[1], (30, 2))
    p = {"w1": jax.random.normal(k[2], (4, 5)) / 2, "w2": jnp.ones((5, 2)) / 3}

    def loss(q):
        return 0.5 * jnp.mean(jnp.sum((jnp.tanh(x @ q["w1"]) @ q["w2"] - y) ** 2, -1))

    return loss, p


def test_zero_second_moments_give_a_finite_edge_ratio_and_hypergradient():
    """Adam divides by sqrt(nu) with nu = 0 on dead coordinates: 0 * inf must not poison the probe
    (wrapped optax) or the hypergradient (built-in, safe_sqrt)."""
    from rodflow_jax.experiments._hypergrad import hypergradient, objective_value

    loss, p0 = _dead_input_problem()
    builtin = make_optimizer("adam", learning_rate=0.05)
    wrapped = from_optax(optax.adam(0.05), slow_decay=None)
    (zb, sb), (zw, sw) = builtin.init(p0), wrapped.init(p0)
    for _ in range(30):
        zb, sb = builtin.step(zb, sb, jax.grad(loss)(zb.params))
        zw, sw = wrapped.step(zw, sw, jax.grad(loss)(zw.params))
    assert float(jnp.min(sb.nu["w1"])) == 0.0  # the case under test
    rb, rw = edge_probe(builtin, loss, zb, sb).ratio, edge_probe(wrapped, loss, zw, sw).ratio
    assert np.isfinite(rw) and np.isclose(rw, rb, rtol=1e-9)
    _, g = hypergradient(loss, p0, builtin, 40, objective="mean_loss_last:5", model="discrete")
    h = 1e-6
    f = [objective_value(loss, p0, builtin.with_hyperparameters(learning_rate=0.05 + s), 40,
                         objective="mean_loss_last:5", model="discrete") for s in (h, -h)]
    assert np.isfinite(g["learning_rate"]) and np.isclose(g["learning_rate"], (f[0] - f[1]) / (2 * h), rtol=1e-5)
