"""What seeds the discrete run's first catapult: rounding, measured two ways.

1. *Noise injection.* The discrete run is repeated with ``sigma |w_i| xi_i`` (``xi`` standard
   normal, fresh each step) added to every parameter after every step, for ``sigma`` from 1e-16
   to 1e-10, two seeds each; the first catapult (the records' rule, on the period-2 average of
   the loss) is printed against ``sigma = 0``. If it moves at ``sigma`` near the unit roundoff
   (1.1e-16), the run's own rounding is its seed; if it does not move even at 1e-10, something
   larger and deterministic is.
2. *The rounding of one step* along the top Hessian direction ``e`` at step ``--at`` (before the
   edge), by ``rodflow_jax.flows._rounding.step_rounding`` (what the rods are seeded with), against
   the parameters' own rounding ``u |w_e| / sqrt(3)`` (``|w_e|^2 = sum_i e_i^2 w_i^2``).

    python benchmarks/rounding_seed.py --out benchmarks/results/rounding_seed.json
    python benchmarks/rounding_seed.py --cells toy:gd@150,benchmarks/elu_surface.py:make:gd:0.25@130

A cell is ``problem:optimizer@step`` (a built-in problem, the grid's hyperparameters) or
``FILE.py:make:optimizer:learning_rate@step`` (a problem file, as ``rodflow compare --problem``).
The top eigenvector comes from the dense Hessian, so keep to models of a few thousand parameters.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # noqa: E402  (sets float64)

import rodflow_jax as rf  # noqa: E402
from rodflow_jax._catapults import detect_catapults  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402
from rodflow_jax.flows._rounding import step_rounding  # noqa: E402

CELLS = ["toy:gd@150", "toy:rmsprop@160", "deep-linear:scalar_rmsprop@160", "mlp-digits:gd@300",
         "benchmarks/elu_surface.py:make:gd:0.25@130"]
SIGMAS = (1e-16, 1e-15, 1e-14, 1e-13, 1e-12, 1e-10)


def load(cell: str):
    """``(label, loss_fn, params0, optimizer, step)`` of a cell (module docstring)."""
    spec, at = cell.rsplit("@", 1)
    parts = spec.split(":")
    if parts[0].endswith(".py"):
        path, fn, name, lr = parts
        loss_fn, params0 = rf.load_user_problem(f"{path}:{fn}")
        opt = rf.make_optimizer(name, learning_rate=float(lr))
    else:
        pname, name = parts
        problem = rf.get_problem(pname)
        loss_fn, params0 = problem.make(0)
        opt, _ = fidelity.make_cell_optimizer(problem, name, None)
    return spec, loss_fn, params0, opt, int(at)


def noisy_rollout(opt, loss_fn, params0, steps: int):
    """``(sigma, key) -> loss (steps + 1,)`` of the run with relative noise ``sigma`` after each step."""
    vg = jax.value_and_grad(loss_fn)

    @jax.jit
    def roll(sigma, key):
        def body(carry, k):
            phase, slow = carry
            loss, g = vg(phase.params)
            phase, slow = opt.step(phase, slow, g)
            leaves, tree = jax.tree.flatten(phase.params)
            keys = jax.random.split(jax.random.fold_in(key, k), len(leaves))
            noisy = [x + sigma * jnp.abs(x) * jax.random.normal(kk, x.shape, x.dtype) for x, kk in zip(leaves, keys)]
            return (rf.Phase(jax.tree.unflatten(tree, noisy), phase.momentum), slow), loss

        return jax.lax.scan(body, opt.init(params0), jnp.arange(steps + 1))[1]

    return roll


def first_catapult(loss) -> int | None:
    loss = np.asarray(loss)
    found = detect_catapults(0.5 * (loss[:-1] + loss[1:]))
    return int(found[0]) if found.size else None


def measured_rounding(opt, loss_fn, params0, at: int):
    """``(measured, parameters')``: the rms rounding of one step along the top Hessian direction
    at step ``at``, by ``step_rounding`` and by ``u |w_e| / sqrt(3)``."""
    phase, slow = rf.run_discrete(opt, loss_fn, params0, at).state_at(at)
    flat, unravel = ravel_pytree(phase.params)
    hessian = np.asarray(jax.jit(jax.hessian(lambda x: loss_fn(unravel(x))))(flat))
    e = np.linalg.eigh(hessian)[1][:, -1]
    var = np.asarray(ravel_pytree(step_rounding(opt, loss_fn, phase, slow))[0])
    u = np.finfo(np.float64).eps / 2
    return float(np.sqrt(e**2 @ var)), float(u * np.sqrt(e**2 @ np.asarray(flat) ** 2) / np.sqrt(3))


def run(cell: str, steps: int, seeds: int):
    label, loss_fn, params0, opt, at = load(cell)
    t = time.perf_counter()
    roll = noisy_rollout(opt, loss_fn, params0, steps)
    base = first_catapult(roll(0.0, jax.random.PRNGKey(0)))
    firsts = {s: [first_catapult(roll(s, jax.random.PRNGKey(i))) for i in range(seeds)] for s in SIGMAS}
    measured, params_only = measured_rounding(opt, loss_fn, params0, at)
    row = dict(cell=label, first_catapult=base, with_noise={f"{s:g}": v for s, v in firsts.items()},
               rounding_step=at, rounding_along_top=measured, parameter_rounding_along_top=params_only,
               ratio=measured / params_only, wall_s=time.perf_counter() - t)
    shifts = "  ".join(f"{s:.0e}: {','.join('-' if f is None or base is None else f'{f - base:+d}' for f in v)}"
                       for s, v in firsts.items())
    print(f"{label:42s} first {base}  shift with noise  {shifts}  |  rounding along e {measured:.1e} "
          f"= {row['ratio']:.1f}x u|w_e|/sqrt3 ({row['wall_s']:.0f} s)", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=",".join(CELLS), help="comma list (module docstring)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, {platform.machine()}", flush=True)
    rows = [run(c, args.steps, args.seeds) for c in args.cells.split(",")]
    if args.out:
        write_json(Path(args.out), {"description": __doc__.splitlines()[0], "platform": platform.machine(),
                                    "jax": jax.__version__, "sigmas": list(SIGMAS), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
