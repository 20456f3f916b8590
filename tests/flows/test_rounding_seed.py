"""The rods' model of what seeds the first catapult: a field that is exact at any size of ``r``
(sampled at ``sqrt(u) |c|`` when shorter), and the rounding each optimizer step adds to the
oscillation, measured and fed in as a variance (flows/_rounding.py, RodFlow.add_rounding_seed)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import flat, lr_for, tiny_mlp

import rodflow_jax as rf
from rodflow_jax._discrete import run_discrete
from rodflow_jax._integrate import integrate
from rodflow_jax._tree import tree_sum_squares, tree_vdot
from rodflow_jax.flows import RodState, rod_flow
from rodflow_jax.flows import _rod
from rodflow_jax.flows._rounding import step_rounding


def _rod_at(name="gd", steps=12, dtype=jnp.float64):
    loss, params = tiny_mlp(dtype=dtype)
    opt = rf.make_optimizer(name, learning_rate=lr_for(name))
    run = run_discrete(opt, loss, params, steps)
    (z0, s0), (z1, s1) = run.state_at(steps - 2), run.state_at(steps - 1)
    return rod_flow(opt, loss, z0, s0, z1, s1)


def _rate(rod, y, size):
    """``<r, v_r>/|r|^2`` of the rod's field with ``r`` rescaled to length ``size``."""
    r = jax.tree.map(lambda x: x * size / float(rod.half_norm(y)), y.half)
    v = rod.vector_field(0.0, y._replace(half=r), None)
    return float(tree_vdot(r, v.half) / tree_sum_squares(r))


@pytest.mark.parametrize("name", ["gd", "rmsprop", "heavy_ball"])
def test_the_field_along_r_is_exact_at_any_size(name, monkeypatch):
    """Below ``sqrt(u) |c|`` the map is linear in ``r``; sampled there and scaled back, the rate
    along ``r`` is the same from 1e-4 down to 1e-18 (where ``c +- r`` round to ``c``)."""
    rod, y = _rod_at(name)
    rates = [_rate(rod, y, s) for s in (1e-4, 1e-7, 1e-10, 1e-14, 1e-18)]
    np.testing.assert_allclose(rates, rates[0], rtol=1e-6)
    monkeypatch.setattr(_rod, "sample_floor", lambda dtype: 0.0)  # sampled where it is: rounding
    assert abs(_rate(rod, y, 1e-18) - rates[0]) > 0.1 * abs(rates[0])


def test_the_sampled_field_keeps_the_symmetry_and_the_stable_limit():
    rod, y = _rod_at("rmsprop")
    tiny = y._replace(half=jax.tree.map(lambda x: 1e-12 * x / float(rod.half_norm(y)), y.half))
    flipped = tiny._replace(half=jax.tree.map(jnp.negative, tiny.half))
    a, b = rod.ode_field(0.0, tiny, None), rod.ode_field(0.0, flipped, None)
    np.testing.assert_allclose(flat(a.centre), flat(b.centre), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(flat(a.half), -flat(b.half), rtol=1e-12, atol=1e-30)
    zero = y._replace(half=jax.tree.map(jnp.zeros_like, y.half))
    assert np.all(flat(rod.ode_field(0.0, zero, None).half) == 0.0), "r = 0 must stay invariant"


def test_step_rounding_scales_with_the_unit_roundoff():
    """The measured rounding is relative: about (u |w|)^2 per parameter, and float32's is
    (u32 / u64)^2 = 2^58 times float64's (within two decades)."""
    out = {}
    for dtype in (jnp.float64, jnp.float32):
        loss, params = tiny_mlp(dtype=dtype)
        opt = rf.make_optimizer("gd", learning_rate=0.5)
        phase, slow = opt.init(params)
        var = step_rounding(opt, loss, phase, slow)
        assert jax.tree.structure(var) == jax.tree.structure(params)
        assert all(v.dtype == dtype for v in jax.tree.leaves(var))
        out[dtype] = float(sum(jnp.sum(v) for v in jax.tree.leaves(var)))
        u = float(jnp.finfo(dtype).eps) / 2
        size = float(tree_sum_squares(params))
        assert 1e-4 * u**2 * size < out[dtype] < 1e2 * u**2 * size, dtype
    assert 56 < np.log2(out[jnp.float32] / out[jnp.float64]) < 63


def test_the_seed_holds_a_decaying_rod_at_its_noise_level():
    """GD on ``L = (a x^2 + b y^2)/2`` with ``eta a = 1.5``: the rod's r-mode along ``x`` decays at
    the corrected rate ``q = -0.625`` per step. Fed a variance ``d^2`` per step, ``|r|^2`` settles at
    ``d^2 / (2 |q|)``, where the discrete run's oscillation settles under a noise of that variance;
    without the seed it decays on."""

    def loss(p):
        return 0.5 * (1.5 * p["x"] ** 2 + 0.1 * p["y"] ** 2)

    opt = rf.make_optimizer("gd", learning_rate=1.0)
    z0, s0 = opt.init({"x": jnp.asarray(0.3), "y": jnp.asarray(1.0)})
    z1, s1 = opt.step(z0, s0, jax.grad(loss)(z0.params))
    flow, y0 = rf.make_flow("rod2", opt, loss, z0, s0, z1, s1)
    noise = 1e-12  # per parameter and step: d^2 = 1e-12 along any direction
    seeded = eqx.tree_at(lambda f: f.inner.rounding, flow, {"x": jnp.asarray(noise), "y": jnp.asarray(noise)})
    end = integrate(seeded, y0, 0, 60).half_norm[-1]
    assert end == pytest.approx(np.sqrt(noise / (2 * 0.625)), rel=0.02)
    plain = eqx.tree_at(lambda f: f.inner.rounding, flow, None)
    assert integrate(plain, y0, 0, 60).half_norm[-1] < 1e-3 * end


def test_every_rod_carries_its_measured_rounding():
    rod, _ = _rod_at("adam")
    assert rod.rounding is not None
    assert all(float(jnp.min(v)) >= 0.0 for v in jax.tree.leaves(rod.rounding))
    flow, _ = rf.make_flow("rod2", *_start_states())
    assert flow.inner.rounding is not None


def _start_states():
    loss, params = tiny_mlp()
    opt = rf.make_optimizer("gd", learning_rate=lr_for("gd"))
    run = run_discrete(opt, loss, params, 4)
    (z0, s0), (z1, s1) = run.state_at(2), run.state_at(3)
    return opt, loss, z0, s0, z1, s1
