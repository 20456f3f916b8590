"""``from_optax``: any optax transformation as an optimizer, exact against optax and the built-ins."""

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rodflow_jax import InputError, integrate, make_flow, make_optimizer, run_discrete
from rodflow_jax._integrate import default_solver
from rodflow_jax.optimizers._base import Phase, Slow, describe
from rodflow_jax.optimizers._optax import (
    OptaxOptimizer,
    classify,
    from_optax,
    infer_slow_decay,
    optax_by_name,
    parse_opt_args,
)

from helpers import optax_counterparts, optax_params, flat, lr_for, tiny_mlp

# the optax counterparts of the built-ins (as in test_optimizers.py); the scalar variants have
# none in optax: scalar RMSProp is checked below through a user-written transformation
COUNTERPARTS = optax_counterparts()

OPTAX_ONLY = {
    "adamw_1e-2": lambda: optax.adamw(0.01, weight_decay=1e-2),
    "adamw_1e-4": lambda: optax.adamw(0.01, weight_decay=1e-4),
    "clip_adamw_warmup_cosine": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 0.02, 10, 80, end_value=1e-3), weight_decay=1e-2),
    ),
    "sgd_nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(0.01, min_dim_size_to_factor=4),  # factored second moments: slow
    "muon": lambda: optax.contrib.muon(0.01),  # Newton-Schulz on the matrices, adam on the rest
}


def _params(run):
    """(num_steps + 1, n) flat parameters of a discrete run."""
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(run.params)], axis=1)


def _rel(a, b):
    return float(np.max(np.abs(a - b) / np.abs(b).max(axis=1, keepdims=True)))


def _builtin_as_optax_state(name, z, s):
    """A built-in's ``(z, s)`` (leaves may carry a leading axis) as its optax counterpart's state."""
    if name == "gd":
        return (optax.EmptyState(), optax.EmptyState())
    if name in ("heavy_ball", "nesterov"):
        return (optax.TraceState(z.momentum), optax.EmptyState())
    if name == "rmsprop":
        return (optax.ScaleByRmsState(s.nu), optax.EmptyState(), optax.EmptyState())
    return (optax.ScaleByAdamState(s.count.astype(jnp.int32), z.momentum, s.nu), optax.EmptyState())


@pytest.mark.parametrize("name", sorted(COUNTERPARTS))
def test_counterparts_equal_builtins_and_optax_step_for_step(name):
    """From every state of a built-in run: ``from_optax(tx).step`` = the built-in's step = optax's
    ``update`` + ``apply_updates``, to rounding (compared per step: past the edge of stability
    a rounding difference grows by up to |1 - 2 x ratio| per step along a trajectory)."""
    loss, params = tiny_mlp()
    lr, n = lr_for(name), 60
    builtin, tx = make_optimizer(name, learning_rate=lr), COUNTERPARTS[name](lr)
    ours = from_optax(tx)
    run = run_discrete(builtin, loss, params, n)
    z, s = jax.tree.map(jnp.asarray, (run.phase, run.slow))
    grads = jax.vmap(jax.grad(loss))(z.params)

    @jax.vmap
    def steps(z, s, g):
        state = _builtin_as_optax_state(name, z, s)
        fast, slow = ours.split(state, jnp.float64)
        ref = builtin.step(z, s, g)[0].params
        mine = ours.step(Phase(z.params, fast), Slow(s.count, slow), g)[0].params
        u, _ = tx.update(g, state, z.params)
        return ref, mine, optax.apply_updates(z.params, u)

    ref, mine, plain = (np.asarray(jax.vmap(lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)]))(x))
                        for x in steps(z, s, grads))
    assert _rel(mine, ref) < 1e-14
    assert _rel(mine, plain) < 1e-15  # the wrapped step *is* optax's
    # and whole runs: from_optax in the library's scan = the built-in's; the plain optax loop
    # (compiled differently) agrees until the run is past the edge and amplifies rounding
    traj = _params(run_discrete(ours, loss, params, n))
    assert _rel(traj[:31], _params(run)[:31]) < 1e-12
    assert _rel(traj[:21], optax_params(tx, loss, params, 20)) < 1e-14


@pytest.mark.parametrize("name", sorted(OPTAX_ONLY))
def test_optax_only_transformations_are_exact(name):
    loss, params = tiny_mlp()
    run = run_discrete(from_optax(OPTAX_ONLY[name]()), loss, params, 80)
    assert not run.diverged
    assert _rel(_params(run), optax_params(OPTAX_ONLY[name](), loss, params, 80)) < 1e-10


def test_transformation_that_reads_params():
    """``add_decayed_weights`` needs the parameters: GD on ``L + wd |w|^2 / 2``."""
    loss, params = tiny_mlp()
    wd, lr = 0.05, 0.3
    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr))
    decayed = lambda p: loss(p) + 0.5 * wd * sum(jnp.sum(x**2) for x in jax.tree.leaves(p))  # noqa: E731
    ours = _params(run_discrete(from_optax(tx), loss, params, 60))
    ref = _params(run_discrete(make_optimizer("gd", learning_rate=lr), decayed, params, 60))
    assert _rel(ours, ref) < 1e-12
    # the fast map (used by the flows) sees the parameters too
    opt = from_optax(tx)
    z, s = opt.init(params)
    g = jax.grad(loss)(params)
    mapped = opt.fast_map(z, g, s, opt.slow_map(s, g)).params
    np.testing.assert_allclose(flat(mapped), flat(opt.step(z, s, g)[0].params))


# --- a user-written transformation: scalar RMSProp, classified by the caller ------------------
class ScalarRmsState(NamedTuple):
    nu: jax.Array


def scale_by_scalar_rms(decay=0.9, eps=1e-8):
    def init(params):
        return ScalarRmsState(jnp.zeros((), jax.tree.leaves(params)[0].dtype))

    def update(g, state, params=None):
        nu = decay * state.nu + (1 - decay) * sum(jnp.sum(x**2) for x in jax.tree.leaves(g))
        return jax.tree.map(lambda x: x / jnp.sqrt(nu + eps), g), ScalarRmsState(nu)

    return optax.GradientTransformation(init, update)


def test_unknown_state_needs_classification_and_then_matches_scalar_rmsprop():
    loss, params = tiny_mlp()
    tx = optax.chain(scale_by_scalar_rms(), optax.scale(-0.01))
    with pytest.raises(InputError, match=r"cannot tell whether optax state leaves \[0\]\.nu are fast"):
        from_optax(tx).init(params)
    opt = from_optax(tx, slow=r"\.nu$", slow_decay=0.9)
    ours = _params(run_discrete(opt, loss, params, 60))
    ref = _params(run_discrete(make_optimizer("scalar_rmsprop", learning_rate=0.01), loss, params, 60))
    assert _rel(ours, ref) < 1e-12


class MysteryState(NamedTuple):
    a: jax.Array
    b: jax.Array


def test_error_names_every_unclassified_leaf():
    state = (optax.ScaleByAdamState(jnp.zeros((), jnp.int32), {"w": jnp.zeros(2)}, {"w": jnp.zeros(2)}),
             MysteryState(jnp.zeros(()), {"x": jnp.zeros(3)}))
    with pytest.raises(InputError, match=r"\[1\]\.a, \[1\]\.b\['x'\]") as err:
        classify(state)
    assert "[0].mu" not in str(err.value) and "[0].count" not in str(err.value)
    classes = dict(classify(state, fast=lambda p: p.startswith("[1].b"), slow=r"\[1\]\.a"))
    assert classes == {"[0].count": "slow", "[0].mu['w']": "fast", "[0].nu['w']": "slow",
                       "[1].a": "slow", "[1].b['x']": "fast"}
    with pytest.raises(InputError, match="claimed by both"):
        classify(state, fast="a", slow="a")
    with pytest.raises(InputError, match="rng_key"):  # a PRNG key is not a real-valued state
        from_optax(optax.chain(optax.add_noise(0.1, 0.5, 0), optax.sgd(0.1))).init({"w": jnp.ones(2)})


def test_classification_of_optax_states():
    p = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    cases = {
        optax.adam(0.1): {"count": "slow", "mu": "fast", "nu": "slow"},
        optax.lion(0.1): {"count": "slow", "mu": "fast"},
        optax.rmsprop(0.1, centered=True, momentum=0.9): {"mu": "slow", "nu": "slow", "trace": "fast"},
        optax.adafactor(0.1): {"count": "slow", "v_row": "slow", "v_col": "slow", "v": "slow"},
        optax.inject_hyperparams(optax.adam)(learning_rate=0.1): {"count": "slow", "hyperparams": "slow",
                                                                 "mu": "fast", "nu": "slow"},
        optax.contrib.muon(0.1): {"count": "slow", "mu": "fast", "nu": "slow", "ns_coeffs": "slow"},
    }
    for tx, expected in cases.items():
        for path, cls in classify(tx.init(p)):
            field = [k for k in re.findall(r"\.(\w+)", path) if k in expected][-1]
            assert cls == expected[field], (path, cls)


def test_slow_state_fed_by_the_fast_state_is_refused():
    """adabelief's nu is fed by g - mu: S(s, g) cannot see mu unless mu is slow too."""
    loss, params = tiny_mlp()
    with pytest.raises(InputError, match=r"\[0\]\.nu.*depend on the fast state"):
        from_optax(optax.adabelief(0.01)).init(params)
    opt = from_optax(optax.adabelief(0.01), slow=r"\.mu\b")
    ref = optax_params(optax.adabelief(0.01), loss, params, 40)
    assert _rel(_params(run_discrete(opt, loss, params, 40)), ref) < 1e-10


def test_counts_are_real_valued_in_the_maps_and_integers_in_the_step():
    loss, params = tiny_mlp()
    opt = from_optax(optax.adam(0.01))
    z, s = opt.init(params)
    assert s.nu[0].count.dtype == jnp.float64 and s.count.dtype == jnp.float64
    half = Slow(jnp.asarray(2.5), (s.nu[0]._replace(count=jnp.asarray(2.5)), s.nu[1]))
    assert opt.merge(params, z.momentum, half.nu)[0].count.dtype == jnp.float64  # real time in the maps
    assert opt.merge(params, z.momentum, half.nu, integer_counts=True)[0].count.dtype == jnp.int32
    rounded = from_optax(optax.adam(0.01), integer_counts=True)
    assert int(rounded.merge(params, z.momentum, half.nu)[0].count) == 2  # round half to even
    new = opt.slow_map(half, jax.grad(loss)(params))
    assert float(new.nu[0].count) == 3.5 and float(new.count) == 3.5
    # at integer counts the maps and the step agree (adam computes in float64 either way)
    g = jax.grad(loss)(params)
    step = opt.step(z, s, g)
    np.testing.assert_allclose(flat(opt.fast_map(z, g, s, opt.slow_map(s, g))), flat(step[0]), rtol=1e-15, atol=0)


def test_description_threshold_and_decay():
    opt = from_optax(optax.adamw(0.1, b2=0.99), name="optax:adamw",
                     hyperparameters={"learning_rate": 0.1, "b2": 0.99})
    assert isinstance(opt, OptaxOptimizer) and opt.name == "optax:adamw"
    assert describe(opt) == {"name": "optax:adamw", "learning_rate": 0.1, "b2": 0.99}
    assert not opt.analytic_threshold and opt.preconditioner(None) is None
    assert bool(jnp.isnan(opt.threshold(Slow(jnp.asarray(3.0)))))
    assert from_optax(optax.sgd(0.1)).hyperparameters() == {}
    p = {"w": jnp.ones(4)}
    assert infer_slow_decay(opt, p) == pytest.approx(0.99, rel=1e-12)
    assert infer_slow_decay(from_optax(optax.rmsprop(0.1, decay=0.8)), p) == pytest.approx(0.8, rel=1e-12)
    assert infer_slow_decay(from_optax(optax.sgd(0.1, momentum=0.9)), p) is None
    assert float(from_optax(optax.adam(0.1), slow_decay=0.9).slow_alternation()) == pytest.approx(1 / 1.9)


# --- flows -------------------------------------------------------------------------------
def _as_optax_state(opt, z, s):
    """The built-in Adam's ``(z, s)`` in ``from_optax(optax.adam)``'s representation."""
    state = (optax.ScaleByAdamState(s.count.astype(jnp.int32), z.momentum, s.nu), optax.EmptyState())
    fast, slow = opt.split(state, s.count.dtype)
    return Phase(z.params, fast), Slow(s.count, slow)


@pytest.mark.parametrize("b2", [0.999, 0.9])
def test_flow_vector_fields_equal_builtin_adam(b2):
    """At the same state the rod and stable vector fields agree to rounding; with the exact
    period-2 slow feed this needs ``fast_map`` to honour ``new_slow`` (and the decay)."""
    loss, params = tiny_mlp()
    K, lr = 30, 0.05
    builtin = make_optimizer("adam", learning_rate=lr, b2=b2)
    run = run_discrete(builtin, loss, params, K + 1)
    (z0, s0), (z1, s1) = run.state_at(K), run.state_at(K + 1)
    for honour in (True, False):
        ours = from_optax(optax.adam(lr, b2=b2), slow_decay=infer_slow_decay(from_optax(optax.adam(lr, b2=b2)), params),
                          honour_new_slow=honour)
        (q0, t0), (q1, t1) = _as_optax_state(ours, z0, s0), _as_optax_state(ours, z1, s1)
        for kind, opts in [("rod1", {}), ("rod1", {"exact_slow_feed": False}), ("stable", {})]:
            fb, yb = make_flow(kind, builtin, loss, z0, s0, z1, s1, **opts)
            fo, yo = make_flow(kind, ours, loss, q0, t0, q1, t1, **opts)
            vb, vo = flat(fb.vector_field(0.0, yb, None)[:-1]), flat(fo.vector_field(0.0, yo, None)[:-1])
            err = np.max(np.abs(vb - vo)) / np.max(np.abs(vb))
            if honour or opts or kind == "stable":
                assert err < 1e-13, (honour, kind, opts, err)
            else:  # ignoring new_slow is the naive feed: visibly different from the exact one
                assert err > 1e-4


@pytest.mark.slow
def test_integrated_flows_match_builtin_adam():
    """Over 20 steps the integrated rod (exact slow feed) and stable flows agree with the
    built-in's to well inside the solver tolerance (rtol 1e-7 for the rod, 1e-6 for the stiff
    stable flow): the vector fields are equal, but the slow state carries one more leaf (optax's
    own count), which changes the step-size controller's error norm slightly."""
    loss, params = tiny_mlp()
    K, lr = 30, 0.05
    builtin = make_optimizer("adam", learning_rate=lr)
    ours = from_optax(optax.adam(lr), slow_decay=0.999)
    rb, ro = run_discrete(builtin, loss, params, K + 1), run_discrete(ours, loss, params, K + 1)
    for kind in ("rod1", "stable"):
        fb, yb = make_flow(kind, builtin, loss, *rb.state_at(K), *rb.state_at(K + 1))
        fo, yo = make_flow(kind, ours, loss, *ro.state_at(K), *ro.state_at(K + 1))
        a, b = integrate(fb, yb, K, K + 20), integrate(fo, yo, K, K + 20)
        assert not a.failed and not b.failed
        ca, cb = flat(a.centre), flat(b.centre)
        rtol = default_solver(fb, jnp.float64).rtol
        assert np.max(np.abs(ca - cb)) / np.max(np.abs(ca)) < 0.1 * rtol, kind  # stable: 1.6e-8
        # the stable flows take the implicit Kvaerno5, whose third-order dense output between long
        # steps turns the controller's slightly different steps into up to a tenth of rtol at the saved steps
        np.testing.assert_allclose(b.loss, a.loss, rtol=1e-2 * rtol if kind == "rod1" else 0.1 * rtol)


# --- by name, for the command line ------------------------------------------------------
def test_parse_opt_args():
    assert parse_opt_args("learning_rate=0.1,weight_decay=1e-4,nesterov=true") == {
        "learning_rate": 0.1, "weight_decay": 1e-4, "nesterov": True}
    assert parse_opt_args(" b1 = 0.8 , warmup_steps=10, mode='x', mask=none,name=abc ") == {
        "b1": 0.8, "warmup_steps": 10, "mode": "x", "mask": None, "name": "abc"}
    assert parse_opt_args("") == {}
    for bad, match in [("learning_rate", "must read key=value"), ("a=1,a=2", "given twice"),
                       ("1x=2", "not a valid argument name"), ("a=", "must read key=value"), ("a=nan", "not a number")]:
        with pytest.raises(InputError, match=match):
            parse_opt_args(bad)


@pytest.mark.parametrize("args, match", [
    ("learning_rate=abc", r"learning_rate='abc' must be a number"),
    ("learning_rate=0.05,b1=abc", r"b1='abc' must be a number"),
    ("learning_rate=-0.1", "learning_rate must be positive, got -0.1"),
    ("learning_rate=0", "learning_rate must be positive, got 0"),
    ("learning_rate=inf", "must be finite"),
])
def test_a_word_or_a_non_positive_learning_rate_is_refused_before_anything_runs(args, match):
    """Optax takes ``learning_rate='abc'`` or ``-0.1`` and fails (or ascends) only once it runs;
    the wrapper refuses them at once, as the nine built-ins refuse ``learning_rate <= 0``."""
    with pytest.raises(InputError, match=match):
        from_optax(optax.adam, hyperparameters=parse_opt_args(args))
    from_optax(optax.adam, hyperparameters=parse_opt_args("learning_rate=0.05,eps_root=0,nesterov=true"))
    from_optax(optax.adam, hyperparameters={"learning_rate": optax.constant_schedule(0.1)})  # a schedule passes


def test_optax_by_name():
    tx = optax_by_name("adamw", **parse_opt_args("learning_rate=0.1,weight_decay=1e-4"))
    assert isinstance(tx, optax.GradientTransformation)
    assert isinstance(optax_by_name("contrib.muon", learning_rate=0.1), optax.GradientTransformation)
    with pytest.raises(InputError, match="unknown optax optimizer 'adamx'.*did you mean"):
        optax_by_name("adamx", learning_rate=0.1)
    with pytest.raises(InputError, match=r"optax\.adam\(lr=0\.1\): .*unexpected keyword"):
        optax_by_name("adam", lr=0.1)
    with pytest.raises(InputError, match="not a GradientTransformation"):
        optax_by_name("safe_norm", x=jnp.ones(2), min_norm=0.0)
    with pytest.raises(InputError, match="unknown optax optimizer"):
        optax_by_name("_src", learning_rate=0.1)
