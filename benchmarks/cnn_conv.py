"""cnn-digits: the library convolution against the patch-matmul one the problem now uses.

Times, in one process (compare the ratios), a gradient, a Hessian-vector product, one evaluation
of the rod flow's field and of the second-order rod's (``rod2``: the field, then one ``jvp``), the
endpoints as ``flows/_base.over_endpoints`` evaluates them on this backend, with
``lax.conv_general_dilated`` and with
``rodflow_jax.problems._digits._conv``; and checks they agree. Writes
``benchmarks/results/cnn_conv.json``.

    python benchmarks/cnn_conv.py [--float32] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

OUT = Path(__file__).parent / "results" / "cnn_conv.json"


def _timed(fn, *args, repeats):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--float32", action="store_true")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", not args.float32)

    import rodflow_jax as rf
    from rodflow_jax.optimizers import OPTIMIZERS
    from rodflow_jax.problems import _digits as D

    x, y, _ = D.digits_data(500)
    images = x.reshape(-1, 8, 8, 1)

    def lax_conv(h, w, b):
        return jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b

    def make_loss(conv):
        return lambda p: D.mse_loss(D.cnn_apply(p, images, conv), y)

    params0 = D.init_cnn(jax.random.PRNGKey(0))
    opt = OPTIMIZERS["gd"](learning_rate=0.2)
    z0, s0 = opt.init(params0)
    g0 = jax.grad(make_loss(lax_conv))(params0)
    z1 = z0._replace(params=jax.tree.map(lambda a, b: a - 0.01 * b, params0, g0))

    rows, outputs = {}, {}
    for name, conv in (("lax_conv", lax_conv), ("patch_matmul", D._conv)):
        loss = make_loss(conv)
        grad = jax.jit(jax.grad(loss))
        hvp = jax.jit(lambda p, v, loss=loss: jax.jvp(jax.grad(loss), (p,), (v,))[1])
        row = {"grad_ms": _timed(grad, params0, repeats=args.repeats),
               "hvp_ms": _timed(hvp, params0, g0, repeats=args.repeats)}
        outs = [grad(params0)]
        for kind in ("rod1", "rod2"):
            flow, y0 = rf.make_flow(kind, opt, loss, z0, s0, z1, s0)
            field = jax.jit(lambda y, flow=flow: flow.vector_field(0.0, y, None))
            row[f"{kind}_field_ms"] = _timed(field, y0, repeats=args.repeats)
            outs.append(field(y0))
        rows[name], outputs[name] = row, outs

    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(outputs["lax_conv"]), jax.tree.leaves(outputs["patch_matmul"])))
    speedup = {k: rows["lax_conv"][k] / rows["patch_matmul"][k] for k in rows["lax_conv"]}
    print(f"device: {jax.devices()[0].platform}, {platform.machine()}, "
          f"{'float32' if args.float32 else 'float64'}, largest output difference {diff:.1e}")
    print("| quantity | lax conv (ms) | patch matmul (ms) | speed-up |\n|---|---|---|---|")
    for k in rows["lax_conv"]:
        print(f"| {k.removesuffix('_ms')} | {rows['lax_conv'][k]:.1f} | {rows['patch_matmul'][k]:.1f} | {speedup[k]:.2f}x |")
    result = {"dtype": "float32" if args.float32 else "float64", "machine": platform.machine(),
              "device": jax.devices()[0].platform, "rows": rows, "speedup": speedup, "max_difference": diff}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
