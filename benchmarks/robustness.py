"""Issue 17's table, re-run: each case through the real command line, with what happened.

Every case runs ``python -m rodflow_jax ...`` in a fresh folder on a small user problem (or a
built-in) and records the exit code, the last stderr line, whether a traceback appeared, and
what is left in the folder. Prints a markdown table and writes
``benchmarks/results/robustness.json``.

    python benchmarks/robustness.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "robustness.json"
PROBLEM = '''
import jax, jax.numpy as jnp

def make(seed=0):
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 4)); y = jnp.sin(2 * x[:, :1])
    k = jax.random.split(jax.random.PRNGKey(seed), 2)
    p = {"w1": jax.random.normal(k[0], (4, 16)) / 2, "w2": jax.random.normal(k[1], (16, 1)) / 4}
    def loss(p):
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)
    return loss, p

def nan_later(seed=0):
    def loss(w):
        return jnp.sqrt(jnp.sum(w ** 2) - 0.05)
    return loss, jnp.array([0.6, 0.4])

def eqx_mlp(seed=0):
    import equinox as eqx
    m = eqx.nn.MLP(4, 1, 16, 1, activation=jnp.tanh, key=jax.random.PRNGKey(seed))
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 4)); y = jnp.sin(2 * x[:, :1])
    return (lambda m: jnp.mean((jax.vmap(m)(x) - y) ** 2)), m
'''
BASE = ["compare", "--problem", "prob.py:make", "--learning-rate", "0.3", "--steps", "200"]


def _run(argv, cwd, *, signal_after=None, env=None):
    env = {**os.environ, "MPLBACKEND": "Agg", **(env or {})}
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "rodflow_jax", *argv], cwd=cwd, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    stop_s = None
    if signal_after is not None:
        time.sleep(signal_after)
        t_sig = time.perf_counter()
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=60)
        stop_s = time.perf_counter() - t_sig
    out, err = p.communicate(timeout=900)
    return {"rc": p.returncode, "stderr_last": (err.strip().splitlines() or [""])[-1][:160],
            "traceback": "Traceback" in err, "carriage_returns": err.count("\r"), "stop_s": stop_s,
            "wall_s": round(time.perf_counter() - t, 1), "stdout_tail": out.strip().splitlines()[-2:]}


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.name != "prob.py" and "__pycache__" not in str(p))


def cases():
    def existing_dir(d):
        (d / "run").mkdir()
        (d / "run" / "mine.txt").write_text("keep")

    def existing_file(d):
        (d / "run").write_text("keep")

    def readonly(d):
        pass

    def parent_file(d):
        (d / "afile").write_text("x")

    def empty_cwd(d):
        (d / "sub").mkdir()

    return [
        ("--out DIR holding an earlier run", BASE + ["--out", "run"], existing_dir, {}),
        ("--out DIR with --overwrite", BASE + ["--out", "run", "--overwrite"], existing_dir, {}),
        ("--out FILE (an existing file)", BASE + ["--out", "run"], existing_file, {}),
        ("--out FILE with --overwrite", BASE + ["--out", "run", "--overwrite"], existing_file, {}),
        ("--out . (a non-empty folder)", BASE + ["--out", "."], None, {}),
        ("--out under a read-only place", BASE + ["--out", "/proc/rodflow/run"], readonly, {}),
        ("--out whose parent is a file", BASE + ["--out", "afile/run"], parent_file, {}),
        ("loss turning NaN mid-run", ["compare", "--problem", "prob.py:nan_later", "--learning-rate", "0.1",
                                      "--steps", "200", "--out", "run"], None, {}),
        ("SIGTERM mid-run (probe/compile)", ["compare", "--problem", "mlp-digits", "--steps", "3000",
                                             "--sharpness-method", "dense", "--out", "run"], None, {"signal": 12}),
        ("SIGTERM while writing", BASE + ["--out", "run"], None,
         {"signal": 25, "env": {"RODFLOW_TEST_PAUSE_BEFORE_SWAP": "60"}}),
        ("equinox.nn.MLP as the parameters", ["compare", "--problem", "prob.py:eqx_mlp", "--learning-rate", "0.3",
                                              "--steps", "100", "--out", "run"], None, {}),
        ("hypergrad --no-progress", ["hypergrad", "--problem", "prob.py:make", "--learning-rate", "0.3", "--steps",
                                     "50", "--no-progress"], None, {}),
        ("sweep of a built-in without --learning-rate", ["sweep", "--problem", "quadratic", "--steps", "50",
                                                         "--out", "sw"], None, {}),
        ("diverging discrete run (lr 50)", ["compare", "--problem", "prob.py:make", "--learning-rate", "50",
                                            "--steps", "300", "--out", "run"], None, {}),
        ("--version", ["--version"], None, {}),
        ("bad number --learning-rate nan", BASE + ["--learning-rate", "nan", "--out", "run"], None, {}),
        ("bad --steps 1", BASE + ["--steps", "1", "--out", "run"], None, {}),
        ("bad --start-step 500 > steps", BASE + ["--start-step", "500", "--out", "run"], None, {}),
        ("bad optax name", BASE + ["--optimizer", "optax:adamx", "--out", "run"], None, {}),
    ]


def main():
    rows = []
    for name, argv, setup, opts in cases():
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "prob.py").write_text(PROBLEM)
            if setup:
                setup(d)
            before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
            res = _run(argv, d, signal_after=opts.get("signal"), env=opts.get("env"))
            kept = all(p.exists() and p.read_bytes() == b for p, b in before.items())
            res.update(case=name, left=_listing(d), preexisting_kept=kept)
            rows.append(res)
            stop = "" if res["stop_s"] is None else f"{res['stop_s']:.2f} s"
            print(f"| {name} | {res['rc']} | {res['stderr_last'][:90]} | {'yes' if res['traceback'] else 'no'} | "
                  f"{'yes' if kept else 'NO'} | {', '.join(res['left'])[:60]} | {stop} |", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
