"""The accelerator and scaling benchmarks run end to end at ``--tiny`` size (slow lane)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, out, timeout):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(Path(out).read_text())


@pytest.mark.slow
def test_accelerator_tiny(tmp_path):
    d = _run("accelerator.py", tmp_path / "accelerator.json", timeout=400)
    for key in ("machine", "settings", "sweep", "step_count_check", "rollout_kernel", "per_step", "fidelity",
                "skipped", "step_count_check_passed", "total_wall_s"):
        assert key in d, key
    assert d["machine"]["device_kind"] and d["machine"]["devices"]
    assert d["skipped"] == []
    for dtype in d["settings"]["dtypes"]:
        s, c = d["sweep"][dtype], d["step_count_check"][dtype]
        assert s["num_configurations"] == d["settings"]["lrs"] * d["settings"]["seeds"]
        assert s["vmapped"]["second_call_s"] > 0 and s["loop"]["per_configuration_s"] > 0
        # diffrax's step counts under vmap equal the batch-1 runs' on CPU (float32: no rounding seed)
        assert c["configurations"] >= 2 and c["passed"] and c["max_abs_diff"] == 0, c
        r = d["rollout_kernel"][dtype]
        for k in ("vmap", "lax_map", "engine_rollout_batch"):
            assert r[k]["run_s"] > 0 and r[k]["max_abs_loss_diff_vs_vmap"] < 1e-4, (k, r[k])
        f = d["fidelity"][dtype]
        assert f["rows"] and not f["skipped_for_budget"] and all(r["dtype"] == dtype for r in f["rows"])
    assert d["step_count_check_passed"] is True
    rows = d["per_step"]["rows"]
    assert rows and all({"discrete", "rod", "probe"} <= set(r["models"]) for r in rows)


@pytest.mark.slow
def test_scaling_tiny(tmp_path):
    d = _run("scaling.py", tmp_path / "scaling.json", timeout=400)
    for key in ("machine", "memory_method", "settings", "rows", "count_checks", "slopes", "ten_minute_compare",
                "total_wall_s"):
        assert key in d, key
    assert d["rows"]
    for r in d["rows"]:
        assert set(r["models"]) == {"discrete", "stable", "rod", "inertial", "probe"}
        for m, v in r["models"].items():
            assert v["first_call_s"] > 0 and v["run_s"] > 0 and "peak_mb" in v
        for f in ("stable", "rod", "inertial"):
            assert r["models"][f]["gradients_per_step"] > 1 and r["models"][f]["solver_steps"] > 0
        assert r["models"]["probe"]["hvps_per_warm_probe"] >= 1
    # the gradients-per-step formula matches gradient calls counted at run time
    assert d["count_checks"] and all(c["ok"] for c in d["count_checks"]), d["count_checks"]
    assert set(d["slopes"]["float32"]["mlp"]) == {"discrete", "stable", "rod", "inertial", "probe"}  # None at one size
    assert d["ten_minute_compare"]["float32"]["compiled"]["largest_params"] > 0


def _fidelity_script():
    """``benchmarks/fidelity.py`` as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fidelity_bench", ROOT / "benchmarks" / "fidelity.py")
    fid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fid)
    return fid


def test_fidelity_tables_relabel_a_construction(tmp_path):
    """``--table-from FILE:rod2=rod2_plain`` reads rows saved before ``rod2`` changed as the plain
    construction, so a rerun's ``rod2`` rows and the old ones are told apart."""
    fid = _fidelity_script()
    row = {"problem": "toy", "optimizer": "gd", "rod2_error_final": 0.5, "rod_construction": "rod2",
           "rod_error_final": 0.5, "rod1_error_final": 0.9}
    out = fid.relabel(row, "rod2", "rod2_plain")
    assert out["rod2_plain_error_final"] == 0.5
    assert "rod2_error_final" not in out and out["rod_construction"] == "rod2_plain"
    assert out["rod1_error_final"] == 0.9 and out["rod_error_final"] == 0.5
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"problem": "toy", "rod2_catapult_steps": [3]}]))
    assert fid.load_rows(f"{path}:rod2=rod2_plain") == [{"problem": "toy", "rod2_plain_catapult_steps": [3]}]
    assert fid.load_rows(str(path)) == [{"problem": "toy", "rod2_catapult_steps": [3]}]


def test_fidelity_cost_table_sums_cells_and_schedules_longest_first():
    """The grid's cost table adds a cell's starts, names its costliest model, and schedules cells
    longest first on the workers."""
    fid = _fidelity_script()
    assert fid.schedule_makespan([3, 5, 3, 4, 3], 2) == 10  # 5 | 4, then 3 -> 4+3, 3 -> 5+3, 3 -> 7+3
    assert fid.schedule_makespan([3, 5, 3, 4, 3], 1) == 18
    rows = [{"problem": "toy", "optimizer": "gd", "hyperparameters": {}, "start": "default", "wall_s": 30.0,
             "stable_wall_s": 5.0, "rod_wall_s": 20.0},
            {"problem": "toy", "optimizer": "gd", "hyperparameters": {}, "start": "pre_edge", "wall_s": 30.0,
             "stable_wall_s": 5.0, "rod_wall_s": 20.0},
            {"problem": "cnn", "optimizer": "heavy_ball", "hyperparameters": {"momentum": 0.9}, "start": "default",
             "wall_s": 90.0, "stable_wall_s": 70.0, "rod_wall_s": 10.0}]
    table = fid.cost_table(rows, jobs=2)
    assert table.startswith("cells: 2, compare time 150 s; on 2 workers, longest first: 2 min")
    assert "| cnn heavy_ball (b=0.9) | default | 90 | stable (70) |" in table
    assert "| toy gd | default, pre_edge | 60 | rod (40) |" in table
    assert table.index("| cnn | 90 | 60% |") < table.index("| toy | 60 | 40% |")
    rows[1]["cell_share_s"] = 35.0  # a pass that recorded its share of the oscillation statistics
    assert "| toy gd | default, pre_edge | 65 | rod (40) |" in fid.cost_table(rows, jobs=2)


def test_fidelity_orders_cells_longest_first_by_saved_walls():
    """``--order-from`` runs the costliest saved cells first and cells with no saved wall before
    them, so ``--jobs`` workers are not left waiting on one long cell at the end."""
    fid = _fidelity_script()
    rows = [{"problem": "toy", "optimizer": "gd", "hyperparameters": {}, "start": s, "wall_s": 10.0}
            for s in ("default", "pre_edge")]
    rows.append({"problem": "cnn", "optimizer": "adam", "hyperparameters": {}, "start": "default", "wall_s": 50.0})
    rows.append({"problem": "cnn", "optimizer": "heavy_ball", "hyperparameters": {"momentum": 0.9},
                 "start": "default", "wall_s": 5.0})
    tasks = [("toy", "gd"), ("cnn", "heavy_ball"), ("cnn", "adam"), ("new", "gd")]
    labels = ["toy gd", "cnn heavy_ball (b=0.9)", "cnn adam", "new gd"]
    assert fid.longest_first(tasks, labels, rows) == [("new", "gd"), ("cnn", "adam"), ("toy", "gd"), ("cnn", "heavy_ball")]



def test_fidelity_derivative_reaches_only_the_second_order_rods():
    """``--derivative`` becomes a flow option for the models that run a second-order rod (``rod``
    where it resolves to ``rod2``, and ``rod2`` by name), and for nothing else."""
    import rodflow_jax as rf

    fid = _fidelity_script()
    models = ("discrete", "stable", "rod", "rod1", "rod2")
    gd, adam = rf.make_optimizer("gd", learning_rate=0.1), rf.make_optimizer("adam", learning_rate=0.01)
    assert fid.derivative_options(models, gd, None) is None
    assert fid.derivative_options(models, gd, "fd") == {"rod": {"derivative": "fd"}, "rod2": {"derivative": "fd"}}
    assert fid.derivative_options(models, adam, "fd") == {"rod2": {"derivative": "fd"}}  # its rod is inertial


def test_fidelity_runs_the_main_and_momentum_cells_in_one_pool():
    """``--momentum own,0.9`` lists each cell once: the momentum methods at both momenta, the
    others once; ``--momentum 0.9`` alone keeps the others at their own settings, as before."""
    fid = _fidelity_script()
    assert fid.parse_momenta(None) == [None] and fid.parse_momenta("own,0.9") == [None, 0.9]
    with pytest.raises(SystemExit, match="momentum"):
        fid.parse_momenta("0.9,high")
    tasks = fid.grid_tasks(["toy"], ["gd", "heavy_ball"], [None, 0.9])
    assert list(tasks) == [("toy", "gd", None), ("toy", "heavy_ball", None), ("toy", "heavy_ball", 0.9)]
    assert tasks[("toy", "heavy_ball", 0.9)] == "toy heavy_ball (b=0.9)"
    assert list(fid.grid_tasks(["toy"], ["gd", "nesterov"], [0.9])) == [("toy", "gd", None), ("toy", "nesterov", 0.9)]
