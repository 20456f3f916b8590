"""Cost of one flow-field evaluation: a rod's two endpoints in sequence (``lax.map``) or batched
(``vmap``), and the second-order rod's correction by each of its ``derivative`` forms (a second
evaluation of the field, ``"difference"``, or a ``jax.jvp``, ``"jvp"``).

Interleaved rounds in one process, the best of each round's mean kept (timings here are noisy;
read the ratios). Writes ``benchmarks/results/endpoints.json``.

    python benchmarks/endpoints.py [--problems cnn-digits,mlp-digits,transformer-sort] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax

OUT = Path(__file__).parent / "results" / "endpoints.json"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="cnn-digits,mlp-digits,transformer-sort")
    ap.add_argument("--optimizers", default="gd,heavy_ball")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--float32", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", not args.float32)

    import rodflow_jax as rf
    from rodflow_jax.flows import _base
    from rodflow_jax.flows._second_order import DERIVATIVES
    from rodflow_jax.optimizers import OPTIMIZERS

    rows = []
    for pname in args.problems.split(","):
        prob = rf.get_problem(pname)
        loss, params0 = prob.make(0)
        for oname in args.optimizers.split(","):
            kw = {"learning_rate": prob.learning_rates[oname], **prob.hyperparameters.get(oname, {})}
            opt = OPTIMIZERS[oname](**kw)
            z0, s0 = opt.init(params0)
            z1, s1 = opt.step(z0, s0, jax.grad(loss)(params0))
            fields = {}
            for mode in ("vmap", "map"):
                _base.ENDPOINTS = mode
                for kind in ("rod1", "rod2", "inertial"):
                    if rf.FLOWS[kind].supports(opt) is not None:
                        continue
                    for dname in (DERIVATIVES if kind == "rod2" else ("-",)):
                        flow, y0 = rf.make_flow(kind, opt, loss, z0, s0, z1, s1)
                        if dname != "-":
                            flow = rf.second_order(flow.inner, exact_growth=flow.exact_growth, derivative=dname)
                        fn = jax.jit(lambda y, flow=flow: flow.vector_field(0.0, y, None)).lower(y0).compile()
                        jax.block_until_ready(fn(y0))
                        fields[(mode, kind, dname)] = (fn, y0)
            best = {k: float("inf") for k in fields}
            for _ in range(args.rounds):
                for k, (fn, y0) in fields.items():
                    t0 = time.perf_counter()
                    for _ in range(args.repeats):
                        out = fn(y0)
                    jax.block_until_ready(out)
                    best[k] = min(best[k], (time.perf_counter() - t0) / args.repeats * 1e3)
            for (mode, kind, dname), ms in best.items():
                rows.append({"problem": pname, "optimizer": oname, "endpoints": mode, "flow": kind,
                             "derivative": dname, "ms": ms})
    _base.ENDPOINTS = "auto"
    print(f"device: {jax.devices()[0].platform}, {platform.machine()}, {'float32' if args.float32 else 'float64'}")
    print("| problem | optimizer | flow | derivative | vmap (ms) | map (ms) | vmap / map |\n|---|---|---|---|---|---|---|")
    index = {(r["problem"], r["optimizer"], r["flow"], r["derivative"], r["endpoints"]): r["ms"] for r in rows}
    for (p, o, f, d, m), ms in index.items():
        if m == "vmap":
            other = index[(p, o, f, d, "map")]
            print(f"| {p} | {o} | {f} | {d} | {ms:.2f} | {other:.2f} | {ms / other:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": jax.devices()[0].platform, "machine": platform.machine(),
                                          "dtype": "float32" if args.float32 else "float64", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
