import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rodflow_jax as rf
from rodflow_jax._catapults import (
    CatapultMatch,
    detect_catapults,
    first_on_time,
    loss_floor,
    match_catapults,
    reference_floor,
    sharpness_drop,
)


def _bump(k, centre, height, width=4.0):
    return height * np.exp(-0.5 * ((k - centre) / width) ** 2)


def _valley(n=1000, centres=(200, 450, 700), height=1.0):
    """A slowly falling loss with a factor-(1 + height) spike at each of ``centres``."""
    k = np.arange(n, dtype=float)
    base = 0.5 * np.exp(-k / 800.0)
    return k, base * (1.0 + sum(_bump(k, c, height) for c in centres))


def test_known_spikes_are_found_on_their_rising_flank():
    k, loss = _valley()
    found = detect_catapults(loss)
    assert len(found) == 3
    for step, centre in zip(found, (200, 450, 700)):
        # 1.5x the baseline is crossed where the bump reaches 0.5: 4.7 steps before its centre
        assert centre - 8 <= step <= centre - 2


def test_small_bumps_and_slow_drift_are_not_spikes():
    k, loss = _valley(height=0.3)  # peaks at 1.3x: below rise = 1.5
    assert detect_catapults(loss).size == 0
    assert detect_catapults(loss, rise=1.2).size == 3
    assert detect_catapults(np.linspace(1.0, 0.1, 500)).size == 0


def test_spikes_closer_than_merge_are_one():
    k = np.arange(600, dtype=float)
    loss = 0.1 * (1.0 + _bump(k, 200, 2.0) + _bump(k, 222, 2.0) + _bump(k, 400, 2.0) + _bump(k, 460, 2.0))
    found = detect_catapults(loss, merge=25)
    assert len(found) == 3 and found[0] < 200 and 390 < found[1] < 400 and 450 < found[2] < 460
    assert len(detect_catapults(loss, merge=0)) == 4  # no merging: the rebound counts too
    assert len(detect_catapults(loss, merge=80)) == 2


def test_a_catapult_that_leaves_the_loss_higher_still_ends():
    """The spike ends when the loss has fallen by the factor ``rise`` from its peak, so a second
    catapult from the raised plateau is found."""
    k = np.arange(800, dtype=float)
    loss = 0.01 * np.where(k < 250, 1.0, 3.0) + 0.05 * (_bump(k, 250, 1.0) + _bump(k, 550, 1.0))
    found = detect_catapults(loss)
    assert len(found) == 2 and 240 < found[0] <= 250 and 540 < found[1] < 550


def test_nan_tail_and_empty_input():
    k, loss = _valley(centres=(200,))
    tail = loss.copy()
    tail[600:] = np.nan
    np.testing.assert_array_equal(detect_catapults(tail), detect_catapults(loss[:600]))
    # a blow-up that is still rising when the loss becomes non-finite is the divergence itself
    blow = loss.copy()
    blow[500:520] = loss[500] * np.exp(np.arange(20.0))
    blow[520:] = np.inf
    np.testing.assert_array_equal(detect_catapults(blow), detect_catapults(loss[:500]))
    # ... while a spike still open at the end of a finite run is kept
    assert len(detect_catapults(blow[:510])) == 2
    assert detect_catapults([]).size == 0
    assert detect_catapults(np.full(50, np.nan)).size == 0
    assert detect_catapults([np.nan, 1.0, 5.0]).size == 0  # cut at the first non-finite entry


def test_negative_losses():
    """The toy's loss goes negative: it is measured from min - 1 % of its range."""
    k = np.arange(600, dtype=float)
    loss = 0.5 * np.exp(-k / 20.0) - 8e-4 + 0.02 * (_bump(k, 300, 1.0) + _bump(k, 480, 1.0))
    assert loss.min() < 0
    floor = loss_floor(loss)
    assert floor == pytest.approx(loss.min() - 0.01 * (loss.max() - loss.min()))
    found = detect_catapults(loss)
    assert len(found) == 2 and 290 < found[0] < 300 and 470 < found[1] < 480
    # with an explicit floor the rule is invariant under a shift of the loss
    np.testing.assert_array_equal(detect_catapults(loss + 5.0, floor=floor + 5.0), found)
    # noise at the floor is not a spike
    flat = -1e-3 + 1e-7 * np.random.default_rng(0).standard_normal(400)
    flat[0] = 0.5
    assert detect_catapults(flat).size == 0
    assert loss_floor(np.array([0.3, 0.1])) == 0.0


def test_a_flow_is_measured_on_the_discrete_runs_scale():
    """A flow from step K whose loss equals the discrete run's fires the same catapults after K:
    on a negative loss its floor is the discrete run's, not one set by its own (smaller) range,
    from which each small wiggle starts a spike, 22 steps before the catapult it then swallows."""
    k = np.arange(600, dtype=float)
    wiggles = sum(_bump(k, c, 5e-4, 2.0) for c in range(120, 600, 40))
    loss = 0.6 * np.exp(-k / 10.0) - 1e-3 + wiggles + sum(_bump(k, c, 4e-3, 3.0) for c in range(140, 600, 40))
    K = 100
    reference = [s for s in detect_catapults(loss) if s >= K]
    assert len(reference) == 12
    tail = loss[K:]
    assert reference_floor(loss, tail) == loss_floor(loss)
    np.testing.assert_array_equal(detect_catapults(tail, k[K:], floor=reference_floor(loss, tail)), reference)
    own = detect_catapults(tail, k[K:])  # its own floor: every catapult read from the wiggle before it
    np.testing.assert_array_equal(own, np.asarray(reference) - 22)
    # a flow below the run's floor is measured from its own
    low = tail - 0.05
    assert reference_floor(loss, low) == loss_floor(low) < loss_floor(loss)
    assert reference_floor(loss + 1.0, tail + 1.0) == 0.0  # a positive loss: 0, as before


def _sharpness_with_one_drop(coarse=10):
    steps = np.arange(0, 1000, coarse)
    sharp = 10.0 + 0.01 * np.sin(steps)  # the edge-of-stability plateau, 0.1 % wander
    sharp = sharp * np.where((steps >= 205) & (steps < 300), 0.85, 1.0)  # a 15 % drop after step 200 only
    sharp[::7] = np.nan  # missed probes
    return steps, sharp


def test_a_spike_without_a_sharpness_drop_is_rejected():
    k, loss = _valley()
    ss, sharp = _sharpness_with_one_drop()
    kept = detect_catapults(loss, sharpness=sharp, sharpness_steps=ss)
    np.testing.assert_array_equal(kept, detect_catapults(loss)[:1])
    first = detect_catapults(loss)[0]
    assert sharpness_drop(first, sharp, ss) == pytest.approx(0.15, abs=2e-3)
    assert detect_catapults(loss, sharpness=sharp, sharpness_steps=ss, drop=0.2).size == 0
    # no finite probe near a spike: no evidence, rejected
    blind = np.where(ss < 400, np.nan, sharp)
    assert detect_catapults(loss, sharpness=blind, sharpness_steps=ss).size == 0
    with pytest.raises(ValueError):
        detect_catapults(loss, sharpness=sharp)  # 100 probes for 1000 steps need their steps


def test_a_spike_between_sparse_probes_keeps_its_sharpness_drop():
    """Probes every 30 steps (a 1,500-step ``compare``'s default) and a spike starting at 116:
    no probe lies in the 25 steps before it, so the windows widen to the probe spacing. (Seen on
    a tanh network: the run's largest catapult, sharpness 7.65 -> 5.16, was dropped.)"""
    k = np.arange(600, dtype=float)
    loss = 0.05 * np.exp(-k / 300.0) * (1.0 + _bump(k, 127, 30.0) + _bump(k, 397, 30.0))
    found = detect_catapults(loss)
    assert list(found) == [116, 386]
    ss = np.arange(0, 600, 30)
    sharp = np.where((ss > 116) & (ss < 240), 5.2, 7.6) * np.where((ss > 386) & (ss < 480), 0.7, 1.0)
    assert sharpness_drop(116, sharp, ss) == pytest.approx(1 - 5.2 / 7.6)
    np.testing.assert_array_equal(detect_catapults(loss, sharpness=sharp, sharpness_steps=ss), found)
    # a fine grid keeps the 25-step window: the probe 30 steps before is outside it
    fine = np.arange(0, 600, 5)
    step_drop = np.where(fine == 90, 7.6, np.where((fine > 116) & (fine < 240), 5.2, 5.25))
    assert sharpness_drop(116, step_drop, fine) == pytest.approx(1 - 5.2 / 5.25)


def test_steps_are_reported_in_step_units():
    k, loss = _valley()
    found = detect_catapults(loss)
    np.testing.assert_array_equal(detect_catapults(loss, steps=k.astype(int) + 100), found + 100)
    with pytest.raises(ValueError):
        detect_catapults(loss, steps=k[:-1])


def test_match_is_optimal_not_greedy():
    # greedy in order would pair 190 with 100; the optimal assignment pairs it with 200
    m = match_catapults([100, 200], [190])
    assert m.matched == ((200, 190),)
    assert m.count_difference == -1 and m.mean_timing_error == 10.0
    assert m.first_timing_error == 90 and not m.first_within
    m = match_catapults([341, 500, 700], [310, 480, 690, 900])
    assert m.matched == ((341, 310), (500, 480), (700, 690))
    assert m.count_difference == 1
    assert m.mean_timing_error == pytest.approx((31 + 20 + 10) / 3)
    assert m.first_timing_error == -31 and not m.first_within
    m = match_catapults([341, 500, 700], [310, 480, 690, 900], tolerance=25)
    assert m.matched == ((500, 480), (700, 690))


def test_first_within_and_empty_matches():
    assert first_on_time(1000, 1030) and not first_on_time(1000, 1031)  # 3 % of 1000
    assert first_on_time(100, 85) and not first_on_time(100, 116)  # 15 steps
    assert match_catapults([342], [330]).first_within
    empty = match_catapults([], [])
    assert empty.first_within and empty.first_timing_error is None and empty.mean_timing_error is None
    one = match_catapults([342], [])
    assert not one.first_within and one.count_difference == -1 and one.matched == ()


def test_match_record_is_plain_json():
    m = match_catapults(np.array([341, 500]), np.array([np.int64(310)]), tolerance=50.0)
    assert isinstance(m, CatapultMatch)
    d = m.to_json()
    assert json.loads(json.dumps(d)) == d
    assert d["matched"] == [[341, 310]] and d["tolerance"] == 50.0 and d["first_within"] is False
    assert all(type(x) is int for x in d["reference"] + d["model"])


def _midpoint_sharpness(loss_fn, params, every):
    """Top Hessian eigenvalue at the discrete midpoints ``(z_k + z_{k+1})/2``, every ``every`` steps."""
    probe = eqx.filter_jit(jax.vmap(lambda p: rf.top_eigenvalues(loss_fn, p, 1, method="lanczos", num_iter=30)[0]))
    n = jax.tree.leaves(params)[0].shape[0] - 1
    steps = np.arange(0, n, every)
    mids = jax.tree.map(lambda x: 0.5 * (jnp.asarray(x[steps]) + jnp.asarray(x[steps + 1])), params)
    return steps, np.asarray(probe(mids))


@pytest.mark.parametrize(
    "name, hp, expected",
    [
        # GD at the problem's rate: one catapult, at step 342 (sharpness 12.4 -> 10.2, 18 %)
        ("gd", {"learning_rate": 0.2}, [342]),
        # heavy ball at momentum 0.9 (the fidelity grid's rate): eight catapults, drops 10-25 %
        ("heavy_ball", {"learning_rate": 0.3, "momentum": 0.9}, [45, 99, 150, 251, 386, 502, 642, 856]),
    ],
)
def test_catapults_of_a_real_run(name, hp, expected):
    problem = rf.get_problem("mlp-digits")
    loss_fn, params0 = problem.make(0)
    if name == "gd":
        assert hp["learning_rate"] == problem.learning_rates["gd"]
    run = rf.run_discrete(rf.make_optimizer(name, **hp), loss_fn, params0, 1000)
    assert jax.tree.leaves(run.params)[0].dtype == jnp.float64
    avg = 0.5 * (run.loss[:-1] + run.loss[1:])
    found = detect_catapults(avg)
    # onsets are seeded at rounding level: allow a few steps, not more (the GD onset is 342 on
    # one x86 machine and 346 on another, from the same code; perturbations of 1e-12 move it by
    # up to 5 steps, benchmarks/catapult_predictability.py)
    assert len(found) == len(expected)
    np.testing.assert_allclose(found, expected, atol=6)
    ss, sharp = _midpoint_sharpness(loss_fn, run.params, every=10)
    kept = detect_catapults(avg, sharpness=sharp, sharpness_steps=ss)
    np.testing.assert_array_equal(kept, found)
    drops = [sharpness_drop(s, sharp, ss) for s in found]
    assert min(drops) > 0.08
    if name == "gd":
        # GD's later loss bumps (+15-35 %) are a train of mini-catapults with 2-4.5 % sharpness
        # drops: found at rise 1.15, and rejected by the default 5 % sharpness rule
        mini = detect_catapults(avg, rise=1.15)
        assert len(mini) >= 6 and abs(mini[0] - found[0]) <= 3
        assert len(detect_catapults(avg, rise=1.15, sharpness=sharp, sharpness_steps=ss)) <= 2


def test_a_flow_is_probed_at_its_start():
    """A flow's probes are the run's probe steps after its start *and* its first step: a catapult
    under way when the flow starts then has a sharpness to drop from. Measured: transformer-sort,
    heavy ball 0.9, from step 100 of 600 (probes every 12 steps, at 96 and 108): the inertial rod's
    loss spikes at 103 with the discrete run's, but with no probe of its own before 108 that spike
    was dropped and its first catapult read as 88 steps late."""
    problem = rf.get_problem("toy")
    loss_fn, params0 = problem.make(0)
    c = rf.compare(loss_fn, params0, rf.make_optimizer("gd", learning_rate=0.4), 60, start_step=7, probe_every=10,
                   models=("discrete", "stable"))
    steps = c.trajectories["stable_sharpness_step"]
    np.testing.assert_array_equal(steps, [7, 10, 20, 30, 40, 50])
    assert c.metrics["stable"]["probe_cost"]["probes"] == 6
    np.testing.assert_array_equal(c.trajectories["discrete_sharpness_step"], [0, 10, 20, 30, 40, 50])


def test_a_periodic_train_of_catapults_is_one_catapult_each():
    """Spikes closer than ``merge`` steps *from start to start* are one: a train of catapults
    every 32 steps, each over within 15 steps, is one catapult each, although the loss stays low for
    fewer than 25 steps between them (counted from the end, the train read as one spike, as toy
    heavy ball's did until stop 41)."""
    k = np.arange(600, dtype=float)
    centres = np.arange(100, 560, 32)
    loss = 0.01 * (1.0 + sum(_bump(k, c, 20.0) for c in centres))
    found = detect_catapults(loss)
    assert len(found) == len(centres)
    assert len(detect_catapults(loss, merge_from="end")) == 1  # the rule before stop 41
    # 1.5x the baseline is crossed where the bump reaches 0.5: 10.9 steps before its centre
    np.testing.assert_array_less(np.abs(found - (centres - 11)), 2)
