import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rodflow_jax as rf
from helpers import assert_records_close, tiny_mlp


def test_compare_metrics_and_files(tmp_path):
    loss, params = tiny_mlp()
    opt = rf.make_optimizer("gd", learning_rate=0.5)
    result = rf.compare(loss, params, opt, 60, probe_every=10)
    m = result.metrics
    for key in ("optimizer", "num_steps", "threshold", "start_step", "eos_onset_step", "discrete", "stable", "rod"):
        assert key in m
    assert m["optimizer"] == {"name": "gd", "learning_rate": 0.5}
    assert m["start_step"] == 0 and m["threshold"] == pytest.approx(4.0)
    for model in ("stable", "rod"):
        for key in ("param_rel_error_max", "param_rel_error_final", "loss_rel_error_mean", "sharpness_final", "failed",
                    "catapult_steps", "first_catapult_step", "catapult_count_difference",
                    "catapult_mean_timing_error", "first_catapult_timing_error"):
            assert key in m[model]
    assert {"catapult_steps", "first_catapult_step", "eos_crossing_step"} <= set(m["discrete"])
    t = result.trajectories
    assert t["discrete_loss"].shape == (61,) and t["rod_loss"].shape == (61,)
    # the rod starts on mid_0 with the iterates' period-2 part as its half-vector
    run = rf.run_discrete(opt, loss, params, 60)
    lo, hi = rf.period_two_endpoints([run.state_at(j)[0].params for j in range(rf.PERIOD_TWO_ORDER + 1)])
    np.testing.assert_allclose(t["rod_loss"][0], (loss(lo) + loss(hi)) / 2, rtol=1e-12)
    out = result.save(tmp_path / "run")
    assert json.loads((out / "metrics.json").read_text())["num_steps"] == 60
    assert {p.name for p in out.iterdir()} == {
        "metrics.json", "timings.json", "trajectories.npz", "loss.png", "sharpness.png", "param_error.png",
        "summary.png"
    }
    npz = np.load(out / "trajectories.npz")
    for key in ("step", "discrete_loss", "stable_loss", "rod_loss", "stable_param_error", "rod_param_error"):
        assert key in npz


def test_default_start_step():
    assert rf.default_start_step(rf.make_optimizer("gd", learning_rate=0.1)) == 0
    assert rf.default_start_step(rf.make_optimizer("rmsprop", learning_rate=0.1)) == 0
    assert rf.default_start_step(rf.make_optimizer("adam", learning_rate=0.1)) == 100
    assert rf.default_start_step(rf.make_optimizer("heavy_ball", learning_rate=0.1, momentum=0.5)) == 20


def test_diverging_discrete_run_still_reports(tmp_path):
    loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 50.0]) * w**2)  # noqa: E731
    result = rf.compare(loss, jnp.ones(2), rf.make_optimizer("gd", learning_rate=1.0), 300, probe_every=50)
    d = result.metrics["discrete"]
    # the stiff mode grows by |1 - 50| = 49 per step: L(z_2) = 1.4e8 passes 1e6 (1 + L(z_0)) = 2.7e7
    assert d["diverged"] and d["diverged_at"] == 2 and d["final_loss"] is None
    for flow in ("stable", "rod"):  # the flows stop where the discrete run diverged
        assert "stopped at step 2" in result.metrics[flow]["message"], result.metrics[flow]
        assert not result.metrics[flow]["failed"]
    assert np.all(np.isnan(result.trajectories["discrete_loss"][2:]))
    result.save(tmp_path / "run")  # NaNs never break writing


@pytest.mark.parametrize(
    "loss, params, match",
    [
        (lambda w: w, jnp.ones(3), "must return a scalar"),
        (lambda w: jnp.sum(w) * jnp.nan, jnp.ones(3), "not finite"),
        (lambda w: jnp.sum(w), jnp.ones(3, int), "floating-point"),
        # stop-44 QA: these passed the check, then crashed inside the stable flow's solve or its trace
        (lambda w: 1.5, jnp.ones(3), "must return a JAX scalar computed from the parameters, got float 1.5"),
        (lambda w: float(jnp.sum(w)), jnp.ones(3), "must return a JAX scalar"),
        (lambda w: jnp.sum(w) if w[0] > 0 else -jnp.sum(w), jnp.ones(3),
         r"cannot be traced by JAX \(TracerBoolConversionError"),
    ],
)
def test_bad_problems(loss, params, match):
    with pytest.raises(rf.InputError, match=match):
        rf.compare(loss, params, rf.make_optimizer("gd", learning_rate=0.1), 10)


def test_eos_onset_counts_from_the_first_return_below():
    from rodflow_jax._metrics import eos_fraction, eos_onset_step

    steps = np.arange(0, 60, 10)
    assert eos_onset_step(steps, np.array([0.5, 0.8, 0.96, 1.0, 0.99, 1.0])) == 20
    assert eos_onset_step(steps, np.array([3.0, 1.2, 0.6, 0.7, 0.97, 1.0])) == 40  # Adam's transient
    assert eos_onset_step(steps, np.array([0.5, 0.6, 0.7, 0.8, 0.9, 0.9])) is None
    assert eos_onset_step(steps, np.array([1.2, 1.1, 1.0, 1.0, 0.99, 1.0])) == 0  # starts at the edge, stays
    # a run held at 0.9 of the threshold (float32 rounding puts it a hair above) is not at the edge
    assert eos_fraction(steps, np.full(6, np.float32(0.9) + np.float32(3e-8))) == 0.0


def test_where_the_initial_transient_of_a_run_that_starts_past_its_edge_ends():
    from rodflow_jax._metrics import after_initial_transient

    steps = np.arange(0, 100, 4)
    ratio = np.r_[2.0, 1.8, 1.2, 0.9, 0.95, np.ones(20)]
    assert after_initial_transient(steps, ratio) == 12  # back under the threshold at step 12
    assert after_initial_transient(steps, np.r_[1.45, ratio[1:]]) is None  # starts near the edge
    assert after_initial_transient(steps, np.r_[2.0, np.full(24, 1.1)]) is None  # never back under
    assert after_initial_transient(steps, np.r_[np.nan, ratio[1:]]) is None  # no probe at the start
    assert after_initial_transient(steps[1:], ratio[1:]) is None  # no probe at step 0


def _catapulting_pair(u0=3.0):
    """A two-parameter network ``(uv - 1)^2 / 2`` from ``u = u0, v = 0.1``: at GD 0.35 and
    ``u0 = 3`` it starts at 1.58x its threshold, its loss rises 18-fold in two steps and its
    sharpness is back under the threshold at step 4 (at ``u0 = 2``: 0.72x, no transient)."""
    loss = lambda p: 0.5 * (p["u"] * p["v"] - 1.0) ** 2  # noqa: E731
    return loss, {"u": jnp.asarray(u0, jnp.float64), "v": jnp.asarray(0.1, jnp.float64)}


def test_auto_start_skips_an_initial_catapult_and_says_so():
    """``"auto"`` starts the flows where the initial transient ends (step 4) and the record says
    so; the numbers are those of ``start_step=4`` asked for, bit for bit; a start asked for inside
    the transient is kept, with the note that says where it ends."""
    loss, p0 = _catapulting_pair()
    opt = rf.make_optimizer("gd", learning_rate=0.35)
    auto = rf.compare(loss, p0, opt, 40, models=["discrete", "stable", "rod"], probe_every=1, keep_discrete=True)
    assert auto.metrics["start_step"] == 4
    assert "back under it at step 4: the flows start there" in auto.metrics["start_note"]
    assert "--start-step 0 starts them inside it" in auto.metrics["start_note"]
    asked = rf.compare(loss, p0, opt, 40, models=["discrete", "stable", "rod"], probe_every=1, start_step=4,
                       reuse=auto)
    assert "start_note" not in asked.metrics
    for name in ("stable", "rod"):
        assert auto.metrics[name] == asked.metrics[name]
        np.testing.assert_array_equal(auto.trajectories[f"{name}_loss"], asked.trajectories[f"{name}_loss"])
        assert np.isnan(auto.trajectories[f"{name}_loss"][:4]).all()
    inside = rf.compare(loss, p0, opt, 40, models=["discrete", "stable"], probe_every=1, start_step=0, reuse=auto)
    assert inside.metrics["start_step"] == 0
    assert "back under it at step 4" in inside.metrics["start_note"]
    assert "--start-step 4 starts them after it" in inside.metrics["start_note"]


def test_transient_starts_move_only_within_the_first_quarter_and_the_window():
    """The rule on probes alone: a row back under its threshold at step 12 of 100 starts there;
    one that stays above until step 40 (past the first quarter: at its edge, not in a transient)
    and one that starts under 1.5x keep the batch's start; so does one whose later start would
    leave less than the batch's period-two window."""
    from types import SimpleNamespace

    from rodflow_jax.experiments._evaluate import transient_starts

    steps = np.arange(0, 100, 4)

    def ratios(end, first=2.0):
        r = np.full(len(steps), 1.1)
        r[0], r[steps >= end] = first, 0.9
        return r

    rows = np.stack([ratios(12), ratios(40), ratios(12, first=1.4), ratios(8)])
    ev = lambda n, rows: SimpleNamespace(num_steps=n, probe_steps=steps,  # noqa: E731
                                         probes=SimpleNamespace(eigenvalues=rows[:, :, None], threshold=np.ones_like(rows)))
    assert transient_starts(ev(100, rows), 0).tolist() == [12, 0, 0, 8]
    assert transient_starts(ev(100, rows), 10).tolist() == [12, 10, 10, 10]  # 8: not later than the start
    assert transient_starts(ev(18, rows[:1]), 10).tolist() == [10]  # 18 - 12 < 8 steps: the window would shrink


def test_auto_start_moves_only_runs_that_start_past_their_edge():
    """A sweep whose seed 0 starts past its edge and seed 1 below it: each row starts where its
    own comparison starts (4 and 0), with that comparison's record and arrays (calls of one row,
    as compare's), in one call of both rows (to 1e-8: a call of 2 rows rounds otherwise than one of 1) and
    in shards of one (bit for bit); the flows' arrays begin at the batch's start step, NaN before
    a row's own."""
    def make(seed):
        return _catapulting_pair(3.0 if seed == 0 else 2.0)

    kw = dict(models=["discrete", "rod"], probe_every=1)
    grid = {"learning_rate": [0.35]}
    lone = rf.sweep(make, "gd", grid, [0, 1], 40, batch_size=1, **kw)
    assert lone.info["start_step"] == 0 and lone.info["start_after_transient"] is True
    assert [r["start_step"] for r in lone.records] == [4, 0]
    for i, row in enumerate(lone.records):
        c = rf.compare(*make(i), rf.make_optimizer("gd", learning_rate=0.35), 40, **kw)
        assert_records_close({k: v for k, v in row.items() if k not in ("hyperparameters", "seed")}, c.metrics,
                             rtol=1e-12)
        np.testing.assert_allclose(lone.arrays["rod_loss"][i], c.trajectories["rod_loss"][:-1], rtol=1e-12)
    both = rf.sweep(make, "gd", grid, [0, 1], 40, **kw)  # one call of 2 rows, starting at 4 and 0
    assert both.info["batch_size"] == 2
    np.testing.assert_allclose(both.arrays["rod_loss"], lone.arrays["rod_loss"], rtol=1e-8, atol=1e-12)
    assert [r["rod"]["catapult_steps"] for r in both.records] == [r["rod"]["catapult_steps"] for r in lone.records]
    for i in range(2):
        shard = rf.sweep(make, "gd", grid, [0, 1], 40, shard=(i, 2), **kw)
        assert_records_close(shard.records[0], both.records[i], rtol=0)
    assert np.isnan(both.arrays["rod_loss"][0, :4]).all() and np.isfinite(both.arrays["rod_loss"][1]).all()
    assert "start_note" in both.records[0] and "start_note" not in both.records[1]


def test_hypergradient_auto_start_is_compares():
    """``hypergrad``'s and ``tune``'s ``"auto"`` is ``compare``'s: from step 4 on the pair that
    starts at 1.58x (the same value and derivative as ``start_step=4``, recorded in the report),
    from 0 on the one that starts at 0.72x; the discrete model has no start."""
    from rodflow_jax.experiments._hypergrad import flow_start, hypergradient_report

    opt = rf.make_optimizer("gd", learning_rate=0.35)
    loss, p0 = _catapulting_pair()
    assert flow_start(loss, p0, opt, 40, "rod", "auto") == 4 and flow_start(loss, p0, opt, 40, "discrete", "auto") == 0
    assert flow_start(loss, _catapulting_pair(2.0)[1], opt, 40, "rod", "auto") == 0
    kw = dict(model="rod", objective="mean_loss_last:10")
    assert rf.hypergradient(loss, p0, opt, 40, **kw) == rf.hypergradient(loss, p0, opt, 40, start_step=4, **kw)
    assert rf.hypergradient(loss, p0, opt, 40, **kw) != rf.hypergradient(loss, p0, opt, 40, start_step=0, **kw)
    assert hypergradient_report(loss, p0, opt, 40, **kw)["start_step"] == 4


def test_compare_from_a_second_start_reuses_the_discrete_run():
    """``reuse=`` takes an earlier comparison's discrete run and probes instead of recomputing
    them: the records and trajectories equal a fresh comparison's, the reused run costs nothing
    in ``timings``, and a comparison of another run is refused."""
    loss, params = tiny_mlp()
    opt = rf.make_optimizer("rmsprop", learning_rate=0.02)
    first = rf.compare(loss, params, opt, 60, start_step=0, probe_every=10, keep_discrete=True)
    again = rf.compare(loss, params, opt, 60, start_step=24, probe_every=10, reuse=first)
    fresh = rf.compare(loss, params, opt, 60, start_step=24, probe_every=10)
    assert again.metrics == fresh.metrics and again.metrics["start_step"] == 24
    assert again.trajectories.keys() == fresh.trajectories.keys()
    for key, value in fresh.trajectories.items():
        np.testing.assert_array_equal(again.trajectories[key], value, err_msg=key)
    assert "discrete" in fresh.timings and "discrete" not in again.timings and "discrete probes" not in again.timings
    with pytest.raises(rf.InputError, match="reuse"):
        rf.compare(loss, params, rf.make_optimizer("rmsprop", learning_rate=0.03), 60, start_step=24,
                   probe_every=10, reuse=first)
    with pytest.raises(rf.InputError, match="reuse"):
        rf.compare(loss, params, opt, 60, start_step=24, probe_every=20, reuse=first)
    assert fresh.discrete is None  # not kept unless asked
    with pytest.raises(rf.InputError, match="keep_discrete"):
        rf.compare(loss, params, opt, 60, start_step=0, probe_every=10, reuse=fresh)
    with pytest.raises(rf.InputError, match="dtype"):  # equal values in another precision: another run
        rf.compare(loss, jax.tree.map(lambda x: x.astype(jnp.float32), params), opt, 60, start_step=24,
                   probe_every=10, reuse=first)
    # equal but distinct inputs are the same run; a reused comparison kept again serves a third start
    chained = rf.compare(loss, jax.tree.map(jnp.copy, params), rf.make_optimizer("rmsprop", learning_rate=0.02), 60,
                         start_step=24, probe_every=10, reuse=first, keep_discrete=True)
    assert "discrete" not in chained.timings and chained.metrics == fresh.metrics
    third = rf.compare(loss, params, opt, 60, start_step=40, probe_every=10, reuse=chained)
    assert "discrete" not in third.timings and third.metrics["start_step"] == 40


def test_reuse_runs_afresh_where_the_start_was_not_kept():
    """A model too large to keep every step keeps every ``every``-th and the next: a later start
    whose period-two window falls between them is run afresh, with the same result."""
    loss, params = tiny_mlp()
    opt = rf.make_optimizer("gd", learning_rate=0.5)
    n = sum(x.size for x in jax.tree.leaves(params))
    kw = dict(probe_every=12, param_budget=n * 61 / 2.5)  # every = 3: steps 0, 1, 3, 4, 6, 7, ... kept
    first = rf.compare(loss, params, opt, 60, start_step=0, keep_discrete=True, **kw)
    assert not first.discrete.covers(24) and first.discrete.every == 3
    again = rf.compare(loss, params, opt, 60, start_step=24, reuse=first, **kw)
    assert "discrete" in again.timings
    assert again.metrics == rf.compare(loss, params, opt, 60, start_step=24, **kw).metrics


def test_a_diverged_run_reports_no_probe_or_flow_value_after_it():
    """After its divergence a run's state is frozen, and flows stopped there are never solved
    further: found by a QA pass, the frozen state was probed on (a final sharpness 2.4e6 x the
    threshold, an edge crossing after the divergence) and the flows' saves after their stop
    were diffrax's ``inf`` fill, which reads as a blow-up."""
    A = jnp.linspace(0.1, 10.0, 6)
    loss = lambda x: 0.5 * jnp.sum(A * x**2) + 0.25 * jnp.sum(x**4)  # noqa: E731
    result = rf.compare(loss, jnp.ones(6), rf.make_optimizer("gd", learning_rate=0.25), 200, probe_every=4)
    m, t = result.metrics, result.trajectories
    k = m["discrete"]["diverged_at"]
    assert k is not None and 0 < k < 10
    after = t["discrete_sharpness_step"] >= k
    assert after.any() and np.all(np.isnan(t["discrete_sharpness"][after])) and np.all(np.isnan(t["discrete_threshold"][after]))
    assert m["discrete"]["sharpness_final"] == pytest.approx(13.0)  # the Hessian at x = 1: A + 3 x^2, top 10 + 3
    assert m["discrete"]["eos_crossing_step"] is None or m["discrete"]["eos_crossing_step"] < k
    for key, values in t.items():
        assert not np.isinf(np.asarray(values, float)).any(), key


def test_a_failed_flow_leaves_nan_not_inf_where_it_never_reached():
    """From the stop-43 QA pass: a stable flow that stalled at step 22 left diffrax's ``inf`` fill
    in ``stable_loss`` for the rest of the run (a divergence stop already gave NaN)."""
    import diffrax

    from rodflow_jax.experiments._engine import FlowArrays, _outside_blank

    ts = np.arange(6.0)
    failed = int(diffrax.RESULTS.max_steps_reached._value)
    ok = int(diffrax.RESULTS.successful._value)
    loss = np.array([[1.0, 0.9, np.inf, np.inf, np.inf, np.inf], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]])
    arrays = FlowArrays(loss=loss, half_norm=loss.copy(), centre={"w": loss[:, :, None].copy()}, slow=None,
                        variance=loss.copy(), result=np.array([failed, ok]), num_steps=np.array([2, 5]),
                        num_rejected_steps=np.zeros(2, int))
    out = _outside_blank(arrays, ts, ts, np.zeros(2), np.full(2, np.inf))
    for x in (out.loss, out.half_norm, out.variance, out.centre["w"][..., 0]):
        assert not np.isinf(x).any()
        assert np.isnan(x[0, 2:]).all() and np.array_equal(x[0, :2], [1.0, 0.9])
        assert np.array_equal(x[1], loss[1])


def test_a_batch_of_optimizers_or_a_non_optimizer_is_refused_in_one_line():
    """From the stop-43 API QA pass: a vmapped batch of optimizers failed deep in a scan
    ('carry input and carry output must have equal types'), a name or an optax transformation
    with an AttributeError or a dtype TypeError."""
    import optax

    from rodflow_jax import InputError, compare, make_optimizer, run_discrete, sweep

    loss_fn, params0 = rf.get_problem("toy").make(0)
    opts = jax.vmap(lambda lr: make_optimizer("gd", learning_rate=lr))(jnp.array([0.3, 0.4]))
    for call in (lambda: compare(loss_fn, params0, opts, 20, progress=False),
                 lambda: sweep("toy", opts, None, num_steps=20), lambda: run_discrete(opts, loss_fn, params0, 20)):
        with pytest.raises(InputError, match=r"holds a batch of hyperparameters \(learning_rate \(2,\)\)"):
            call()
    for bad in ("gd", optax.adam(0.1)):
        with pytest.raises(InputError, match="takes an optimizer from rf.make_optimizer"):
            run_discrete(bad, loss_fn, params0, 20)


def test_loss_plot_marks_where_a_failed_flow_stopped():
    """A flow that failed (stalled, out of budget) has no curve past ``failed_at``; the panels draw
    a line there in its colour, as they do for a diverged discrete run (stop-43 QA: the failure
    was only in metrics.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rodflow_jax._plot import COLORS, _mark_divergence

    metrics = {"discrete": {"diverged": False}, "stable": {"failed": True, "failed_at": 22, "solver_steps": 40},
               "rod": {"failed": False, "failed_at": None, "solver_steps": 90},
               "inertial": {"failed": True, "failed_at": 5, "solver_steps": 0}}  # never started: no line
    fig, ax = plt.subplots()
    _mark_divergence(ax, metrics)
    (line,) = ax.get_lines()
    assert line.get_label() == "stable flow failed at step 22" and list(line.get_xdata()) == [22, 22]
    assert line.get_color() == COLORS["stable"]
    plt.close(fig)


def test_python_float_parameters_are_named_in_the_refusal():
    """Stop-44 QA: ``[1.0, 2.0]`` or a bare ``1.0`` as params0 was refused as having 'no
    floating-point array leaves' without saying what it had found."""
    for params in ([1.0, 2.0], 1.0):
        with pytest.raises(rf.InputError, match=r"no floating-point array leaves \(found float\): make the parameters"):
            rf.compare(lambda p: jnp.sum(jnp.asarray(p) ** 2), params, rf.make_optimizer("gd", learning_rate=0.1), 10)
