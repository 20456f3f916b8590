"""Sweeps across machines: job-array shards merged back equal the one-machine sweep, refusals
are one line and write nothing, and a jax.distributed run over one global mesh (2 processes x 2
fake CPU devices) equals the one-process sweep."""

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_records_close

from rodflow_jax import InputError, sweep
from rodflow_jax.cli import main
from rodflow_jax.experiments._merge import merge_shards, parse_shard, shard_range
from rodflow_jax.problems._toy import make_toy, toy_loss

GRID = {"learning_rate": [0.3, 0.4, 0.5]}
SEEDS = [0, 1]
KW = dict(models=("discrete", "rod"), probe_every=5)
STEPS = 30
ROOT = Path(__file__).parents[2]


def toy(seed):
    """The built-in toy with one loss function object, so the kernels compile once per batch size."""
    return toy_loss, make_toy(seed)[1]


def _sweep(shard=None, grid=GRID, **kw):
    return sweep(toy, "gd", grid, SEEDS, STEPS, shard=shard, **{**KW, **kw})


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "sweep"
    _sweep().save(out)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The 6 configurations as 2, 3 and 4 shards (4: two shards of one configuration), saved."""
    root = tmp_path_factory.mktemp("shards")
    dirs = {}
    for n in (2, 3, 4):
        dirs[n] = [_sweep((i, n)).save(root / f"s{i}of{n}") for i in range(n)]
    return dirs


def _same_sweep(a: Path, b: Path, rtol=1e-12):
    assert_records_close(json.loads((a / "sweep.json").read_text()), json.loads((b / "sweep.json").read_text()),
                         rtol=rtol)
    with np.load(a / "sweep_arrays.npz") as za, np.load(b / "sweep_arrays.npz") as zb:
        assert sorted(za.files) == sorted(zb.files)
        for k in za.files:
            np.testing.assert_allclose(za[k], zb[k], rtol=rtol, atol=0, err_msg=k)


def test_shard_ranges_tile_the_grid_in_order():
    for total in (1, 5, 6, 7, 64):
        for n in range(1, min(total, 9) + 1):
            ranges = [shard_range(total, (i, n)) for i in range(n)]
            expected = [(int(p[0]), int(p[-1]) + 1) for p in np.array_split(np.arange(total), n)]
            assert ranges == expected
    assert parse_shard("2/4") == (2, 4) and parse_shard(" 0/1 ") == (0, 1)
    for bad, match in [("4/4", "0..3"), ("-1/4", "0..3"), ("1/0", "at least 1"), ("1", "I/N"), ("a/b", "I/N"),
                       ("1/2/3", "I/N")]:
        with pytest.raises(InputError, match=match):
            parse_shard(bad)
    with pytest.raises(InputError, match="leave shards empty"):
        shard_range(3, (0, 4))


@pytest.mark.parametrize("n", [2, 3, 4])
def test_merged_shards_equal_the_whole_sweep(whole, shards, n, tmp_path):
    infos = [json.loads((d / "sweep_info.json").read_text()) for d in shards[n]]
    assert [i["shard"]["configurations"] for i in infos] == [list(shard_range(6, (i, n))) for i in range(n)]
    assert sum(i["num_configurations"] for i in infos) == 6
    out = merge_shards(list(reversed(shards[n])), tmp_path / "merged")  # any order on the command line
    _same_sweep(whole, out)
    with np.load(whole / "sweep_arrays.npz") as za, np.load(out / "sweep_arrays.npz") as zb:
        for k in za.files:  # bit for bit: a shard of one configuration is padded to two rows (unpadded: 2e-13 off)
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
    a, b = (json.loads((d / "sweep_info.json").read_text()) for d in (whole, out))
    assert "shard" not in b and b.pop("merged_shards") == n
    assert a == b  # fingerprint, start step, probe grid, num_configurations: all the whole sweep's
    assert (out / "sweep_loss.png").exists() and (out / "sweep_sharpness.png").exists()
    timings = json.loads((out / "timings.json").read_text())
    assert timings["rod"] == pytest.approx(sum(json.loads((d / "timings.json").read_text())["rod"]
                                               for d in shards[n]))


def diabetes(seed):
    """A tanh 10-16-16-1 network on 128 rows of sklearn's bundled diabetes data: a problem whose
    flows round differently at the two places of a call of two rows (the toy's do not)."""
    import jax

    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    sizes = [10, 16, 16, 1]
    params = [{"w": jax.random.normal(k, (a, b)) / a ** 0.5, "b": jax.numpy.zeros(b)}
              for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
    return _diabetes_loss(), params


@functools.cache
def _diabetes_loss():
    """One loss function object, so the kernels compile once per batch size."""
    import jax.numpy as jnp
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X, y = (X - X.mean(0)) / X.std(0), (y - y.mean()) / y.std()
    X, y = jnp.asarray(X[:128]), jnp.asarray(y[:128])

    def loss(p):
        h = X
        for layer in p[:-1]:
            h = jnp.tanh(h @ layer["w"] + layer["b"])
        return 0.5 * jnp.mean(((h @ p[-1]["w"] + p[-1]["b"])[:, 0] - y) ** 2)

    return loss


def test_a_shard_computes_each_row_at_its_place_in_its_call(tmp_path):
    """5 configurations in shards of 3 and 2, on a problem whose rows round differently at the two
    places of a call: the second shard starts at row 3, the second place of its call in the whole
    sweep, so it is padded in front by one row, and its rows equal the whole sweep's bit for bit.
    (Without that padding its stable flows end 1e-16 off; in calls of the whole batch at once,
    stop 37's layout, a 4-configuration stiff RMSProp sweep of this kind differed by a solver step.)"""
    grid = {"learning_rate": [0.3, 0.35, 0.4, 0.45, 0.5]}
    kw = dict(models=("discrete", "stable"), probe_every=10)
    whole = sweep(diabetes, "gd", grid, [0], 30, **kw).save(tmp_path / "whole")
    parts = [sweep(diabetes, "gd", grid, [0], 30, shard=(i, 2), **kw).save(tmp_path / f"s{i}") for i in range(2)]
    merge_shards(parts, tmp_path / "merged")
    _same_sweep(whole, tmp_path / "merged", rtol=0)
    with np.load(whole / "sweep_arrays.npz") as za, np.load(tmp_path / "merged" / "sweep_arrays.npz") as zb:
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k], err_msg=k)


def test_start_step_is_resolved_over_the_whole_grid():
    # heavy ball's automatic K is ceil(10 / (1 - momentum)): 10 at momentum 0, 20 at 0.5. The
    # first shard holds only momentum 0 and must still start the flows at the grid's K = 20.
    grid = {"momentum": [0.0, 0.5]}
    kw = dict(models=("discrete",), probe_every=5, fixed={"learning_rate": 0.3})
    s0 = sweep(toy, "heavy_ball", grid, [0], STEPS, shard=(0, 2), **kw)
    assert s0.records[0]["hyperparameters"] == {"momentum": 0.0} and len(s0.records) == 1
    assert s0.info["start_step"] == 20
    with pytest.raises(InputError, match="leave shards empty"):
        sweep(toy, "heavy_ball", grid, [0], STEPS, shard=(2, 3), **kw)


def _refused(dirs, out, match):
    with pytest.raises(InputError, match=match):
        merge_shards(dirs, out)
    assert not Path(out).exists()  # nothing written


def test_merge_refusals_write_nothing(whole, shards, tmp_path):
    two, three = shards[2], shards[3]
    out = tmp_path / "m"
    _refused(two[:1], out, r"missing shard\(s\) 1 of 2")
    _refused([two[0], two[0], two[1]], out, "given twice")
    _refused([two[0], whole], out, "is not a sweep shard")
    _refused([two[0], tmp_path], out, "is not a sweep folder")
    _refused([two[0], three[1]], out, "different numbers of shards")
    other = _sweep((1, 2), grid={"learning_rate": [0.3, 0.4, 0.6]}).save(tmp_path / "other")
    _refused([two[0], other], out, "shards of different sweeps .*differ in grid")
    wide = _sweep((1, 2), batch_size=4).save(tmp_path / "wide")  # rows rounded in calls of another size
    _refused([two[0], wide], out, "shards of different sweeps .*differ in batch_size")
    # an edited shard entry: overlapping slices
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in two[1].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    info = json.loads((bad / "sweep_info.json").read_text())
    info["shard"]["configurations"] = [2, 5]
    (bad / "sweep_info.json").write_text(json.dumps(info))
    _refused([two[0], bad], out, "overlapping or incomplete")
    with pytest.raises(InputError, match="one of the shards"):
        merge_shards(two, two[0], overwrite=True)

    # stop-44 QA: hand-edited or damaged shards were a traceback, or merged silently
    def edited(name, edit):
        d = tmp_path / name
        d.mkdir()
        for f in two[1].iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        return d

    def json_edit(file, change):
        def edit(d):
            obj = json.loads((d / file).read_text())
            change(obj)
            (d / file).write_text(json.dumps(obj))
        return edit

    npz = edited("npz", lambda d: (d / "sweep_arrays.npz").write_bytes((d / "sweep_arrays.npz").read_bytes()[:1000]))
    _refused([two[0], npz], out, "cannot read the sweep .BadZipFile")
    text = edited("text", json_edit("sweep.json", lambda r: r[0]["discrete"].update(final_loss="abc")))
    _refused([two[0], text], out, "row 0 of sweep.json has a str as discrete.final_loss, where .* has a number")
    gone = edited("gone", json_edit("sweep.json", lambda r: r[0].update(discrete=None)))
    _refused([two[0], gone], out, "row 0 of sweep.json has no discrete record")
    grid = edited("grid", json_edit("sweep_info.json", lambda i: i["grid"]["learning_rate"].__setitem__(0, 0.31)))
    _refused([two[0], grid], out, "shards of different sweeps .*differ in grid")  # its fingerprint was not edited
    # the CLI writes float64 into sweep_info.json after the fingerprint; a Python shard has no such entry
    cli = edited("cli", json_edit("sweep_info.json", lambda i: i.update(float64=True)))
    merge_shards([two[0], cli], out)


def test_cli_shards_and_merge(tmp_path, capsys):
    base = ["sweep", "--problem", "toy", "--optimizer", "gd", "--learning-rate", "0.3,0.5", "--steps", "20",
            "--models", "discrete", "--probe-every", "5", "--float64", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "whole")]) == 0
    for i in range(2):
        assert main(base + ["--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")]) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(tmp_path / "m"),
                 "--no-progress"]) == 0  # accepted, as by every command (stop-44 QA)
    assert "merged 2 shards: 2 configurations" in capsys.readouterr().out
    _same_sweep(tmp_path / "whole", tmp_path / "m")
    # refusals: one line, exit 2, before any compute or writing
    cases = [
        (base + ["--shard", "2/2", "--out", str(tmp_path / "x")], "0..1"),
        (base + ["--shard", "0/3", "--out", str(tmp_path / "x")], "leave shards empty"),
        (base + ["--shard", "half", "--out", str(tmp_path / "x")], "--shard must be I/N"),
        (["merge", str(tmp_path / "s0"), "--out", str(tmp_path / "x")], "missing shard"),
        (["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "m")], "--overwrite"),
        (base + ["--coordinator", "127.0.0.1:1234", "--out", str(tmp_path / "x")], "missing --num-processes"),
        (base + ["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "0",
                 "--out", str(tmp_path / "x")], "needs --devices all"),
        (base + ["--devices", "all", "--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
         "HOST:PORT"),
        (base + ["--devices", "all", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "0..1"),
        (base + ["--devices", "all", "--coordinator", "h:1", "--num-processes", "2", "--process-id", "0",
                 "--local-device-ids", "a"], "--local-device-ids"),
    ]
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1 and err.startswith("rodflow: error:"), (argv, err)
    assert not (tmp_path / "x").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["gd", "heavy_ball"])
def test_distributed_two_processes_equal_one(tmp_path, optimizer):
    """2 processes x 2 fake CPU devices (gloo collectives): one global mesh of 4 devices. Heavy
    ball also reads its (sharded) momentum on the host to pick its rod construction, which raised
    on a global array until stop 33 (the Adam family's inertial rod likewise)."""
    args = ["sweep", "--problem", "toy", "--optimizer", optimizer, "--learning-rate", "0.3,0.4,0.5", "--seeds", "2",
            "--steps", "30", "--models", "discrete,rod", "--probe-every", "5", "--float64", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "MPLBACKEND": "Agg"}
    dist = args + ["--devices", "all", "--num-processes", "2", "--out", str(tmp_path / "dist")]

    def launch(port):
        argv = [*dist, "--coordinator", f"127.0.0.1:{port}"]
        procs = [subprocess.Popen([sys.executable, "-m", "rodflow_jax", *argv, "--process-id", str(i)], env=env,
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        try:
            outs = [p.communicate(timeout=240) for p in procs]  # a hang fails, it does not block
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        return [p.returncode for p in procs], outs

    codes, outs = launch(_free_port())
    for code, (out, err) in zip(codes, outs):
        assert code == 0, err[-3000:]
    assert "6 configurations" in outs[0][0]
    assert "configurations" not in outs[1][0] and "wrote" not in outs[1][0]  # only process 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dist", "one"]  # one output folder, no leftovers
    _same_sweep(tmp_path / "one", tmp_path / "dist", rtol=0)  # bit for bit: each device runs the plain program
    info = json.loads((tmp_path / "dist" / "sweep_info.json").read_text())
    assert info["devices"] == 4 and info["processes"] == 2
    if optimizer != "gd":  # the refusal below does not depend on the optimizer
        return
    # process 0 alone checks the output folder; its refusal stops both processes, before any compute
    codes, outs = launch(_free_port())
    assert codes == [2, 2]
    assert outs[0][1].strip().splitlines()[-1].endswith("pass --overwrite to replace it")
    assert outs[1][1].strip().splitlines()[-1] == "rodflow: error: process 0 cannot write the output folder (its " \
        "log says why)"


def test_a_configurations_probes_do_not_depend_on_its_place_in_the_batch():
    """Lanczos probes (more than 32 parameters) of a configuration are the same alone and at any
    position of a batch: the start vector is one draw, not one per batch position, so a shard's
    rows equal the whole sweep's (until stop 33 a shard's configurations started from the first
    rows' vectors, and its sharpness and HVP counts differed from the whole sweep's)."""
    import jax
    import jax.numpy as jnp
    from helpers import tiny_mlp

    import rodflow_jax as rf
    from rodflow_jax.experiments._engine import probe_batch, stack_trees

    loss, _ = tiny_mlp()
    points = [tiny_mlp(seed)[1] for seed in range(3)]  # three configurations' states, two probes each
    opt = rf.make_optimizer("gd", learning_rate=0.1)
    slow = opt.init(points[0])[1]

    def probes(idx):
        params = stack_trees([stack_trees([points[i], jax.tree.map(lambda x: 1.1 * x, points[i])]) for i in idx])
        slows = stack_trees([stack_trees([slow, slow]) for _ in idx])
        return probe_batch(stack_trees([opt] * len(idx)), loss, params, slows, method="lanczos")

    whole = probes([0, 1, 2])
    for i in range(3):
        alone = probes([i])
        np.testing.assert_array_equal(alone.hvps[0], whole.hvps[i])
        np.testing.assert_allclose(alone.eigenvalues[0], whole.eigenvalues[i], rtol=1e-13)
    assert int(jnp.asarray(whole.hvps).min()) > 0


def test_a_shard_whose_every_configuration_diverged_merges(tmp_path):
    """A shard whose configurations all diverge before the flows' start has no flow to run; it
    still writes every model's arrays (NaN), so the shards merge into the whole sweep (until stop
    33 merge refused them: "hold different arrays")."""
    grid = {"learning_rate": [0.3, 0.4, 1e3]}  # the second shard: lr 1e3 alone, diverged at once
    whole = sweep(toy, "gd", grid, [0], STEPS, **KW).save(tmp_path / "whole")
    parts = [sweep(toy, "gd", grid, [0], STEPS, shard=(i, 2), **KW).save(tmp_path / f"s{i}") for i in range(2)]
    last = json.loads((parts[1] / "sweep.json").read_text())
    assert all(r["discrete"]["diverged"] for r in last)
    merge_shards(parts, tmp_path / "merged")
    _same_sweep(whole, tmp_path / "merged")


def test_configurations_are_padded_to_whole_calls():
    """A sweep's batch is padded (its last row repeated) to a multiple of its batch size times
    the devices, and the engine's calls are blocks of that size, the last padded: every call of a
    sweep has one shape whatever the layout (a batch of one row, of two and of four round
    differently on XLA's CPU kernels)."""
    import jax
    import jax.numpy as jnp

    from rodflow_jax.experiments._engine import row_blocks
    from rodflow_jax.experiments._sharding import config_sharding, pad_and_shard

    one = config_sharding(jax.devices()[:1])
    x = jnp.arange(6.0).reshape(2, 3)
    assert pad_and_shard(x[:1], one).shape == (2, 3)
    np.testing.assert_array_equal(pad_and_shard(x[:1], one)[1], x[0])
    assert pad_and_shard(x, one).shape == (2, 3) and pad_and_shard(jnp.zeros((3, 1)), one).shape == (4, 1)
    np.testing.assert_array_equal(pad_and_shard(x[:1], None), np.stack([x[0], x[0]]))
    assert pad_and_shard(jnp.zeros((5, 1)), None, rows=4).shape == (8, 1)
    assert pad_and_shard({"a": x[:1], "name": "gd"}, None)["name"] == "gd"
    assert pad_and_shard(x[:1], None, rows=1).shape == (1, 3)  # a whole sweep of one: compare's batch
    assert [b.tolist() for b in row_blocks(5, 2)] == [[0, 1], [2, 3], [4, 4]]
    assert [b.tolist() for b in row_blocks(3, None)] == [[0, 1, 2]]
    assert [b.tolist() for b in row_blocks(1, 2)] == [[0, 0]]


def test_batch_size_is_resolved_and_checked():
    from rodflow_jax.experiments._sweep import resolve_batch_size

    assert resolve_batch_size("auto", 1) == 1  # a sweep of one is compare's batch of one
    assert resolve_batch_size("auto", 20) == 8 and resolve_batch_size("auto", 5) == 5  # on a CPU
    assert resolve_batch_size("3", 7) == 3 and resolve_batch_size(16, 7) == 7
    for bad in ("0", "-2", "1.5", "two"):
        with pytest.raises(InputError, match="batch size must be a positive integer"):
            resolve_batch_size(bad, 4)
