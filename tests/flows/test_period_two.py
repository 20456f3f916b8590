"""The rod's initial half-vector from the iterates' period-2 part (flows/_rod.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rodflow_jax as rf
from rodflow_jax.flows._rod import (
    PERIOD_TWO_ORDER, period_two_endpoints, period_two_half, period_two_trusted, period_two_weights,
)


def test_order_one_is_the_half_difference_of_two_iterates():
    np.testing.assert_array_equal(period_two_weights(1), [-0.5, 0.5])
    z0, z1 = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([4.0, -2.0])}
    np.testing.assert_allclose(period_two_half([z0, z1])["w"], [1.5, -2.0])
    with pytest.raises(ValueError):
        period_two_weights(0)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_polynomial_drift_is_removed_and_the_oscillation_kept(n):
    """z_j = cubic drift + (-1)^j s: order n > 3 returns -s exactly (the rod's sign: n = 1 gives
    (z_1 - z_0)/2 = drift/2 - s); order 2 keeps the curvature's residue."""
    rng = np.random.default_rng(0)
    a, b, c, d, s = rng.normal(size=(5, 3))
    window = [{"w": a + b * j + c * j**2 + d * j**3 + (-1) ** j * s} for j in range(n + 1)]
    r = period_two_half(window)["w"]
    if n > 3:
        np.testing.assert_allclose(r, -s, atol=1e-12)
    else:
        assert np.max(np.abs(r + s)) > 1e-3


@pytest.mark.parametrize("m", [-1.0, -0.9, 0.0, 0.5, 0.99])
def test_a_mode_moving_by_m_per_step_has_gain_minus_half_one_minus_m_to_the_n(m):
    n = PERIOD_TWO_ORDER
    window = [np.array([m**j]) for j in range(n + 1)]
    assert float(period_two_half(window)[0]) == pytest.approx(-(((1 - m) / 2) ** n), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("m, trusted", [(-1.0, True), (-1.05, True), (-1.15, True), (-1.22, False), (-1.5, False)])
def test_a_growing_transient_is_not_trusted_as_a_period_two_part(m, trusted):
    """A drift plus an oscillation moving by m per step: the order-8 filter amplifies it by
    ((1 - m)/2)^8 (2.0 at m = -1.18), and past a factor 2 the rod starts from the two iterates
    (the drift here is small, so |r_1| ~ the oscillation's size); per row under vmap."""
    rng = np.random.default_rng(1)
    s, b = rng.normal(size=(2, 4))
    window = [{"w": 0.01 * b * j + m**j * s} for j in range(PERIOD_TWO_ORDER + 1)]
    assert bool(period_two_trusted(window)) is trusted
    batched = [{"w": np.stack([x["w"], 0.0 * x["w"] + (-1.0) ** j])} for j, x in enumerate(window)]
    np.testing.assert_array_equal(jax.vmap(lambda *w: period_two_trusted(w))(*batched), [trusted, True])
    assert bool(period_two_trusted(window[:2]))  # order 1 is the two iterates themselves


def test_endpoints_keep_the_centre():
    rng = np.random.default_rng(1)
    window = [{"w": rng.normal(size=4)} for _ in range(9)]
    lo, hi = period_two_endpoints(window)
    np.testing.assert_allclose((lo["w"] + hi["w"]) / 2, (window[0]["w"] + window[1]["w"]) / 2, atol=1e-15)
    np.testing.assert_allclose((hi["w"] - lo["w"]) / 2, period_two_half(window)["w"], atol=1e-15)


@pytest.mark.slow
def test_a_rod_started_before_the_edge_fires_its_first_catapult_on_time():
    """The toy's GD run, started 30 steps before the edge: with r = (z_{K+1} - z_K)/2 the
    second-order rod fired 48 steps early (its drift seeded the instability at 2e-8 instead of
    rounding level); from the period-2 part it fires within 3 % of the discrete run."""
    p = rf.get_problem("toy")
    loss, p0 = p.make(0)
    opt = rf.make_optimizer("gd", learning_rate=p.learning_rates["gd"])
    m = rf.compare(loss, p0, opt, 300, start_step=30, models=("discrete", "rod2"), probe_every=5).metrics
    first, rod = m["discrete"]["first_catapult_step"], m["rod2"]["first_catapult_step"]
    assert first is not None and rod is not None
    assert abs(rod - first) <= max(15, 0.03 * first), (rod, first)
