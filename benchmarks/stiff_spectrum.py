"""Why a stiff stable flow's GMRES solves grow: the spectrum of its stage matrices, and what
deflating (recycling) the stiffest eigenvectors would save at best.

The stable flow is integrated with the default stiff solver from the default start step to each
of ``--times``. There the dense Jacobian ``J`` of the vector field is formed (``n`` JVPs; only for
``n <= --max-n``) and, for Kvaerno5's stage matrix ``A = I - gamma h J`` (``gamma = 0.26``, ``h``
the solver's mean accepted step over the last window and twice that), this reports:

* the eigenvalue count of ``gamma h J`` beyond 1 in modulus (the "stiff" ones) and ``|A|``'s
  spread ``kappa = max |1 - gamma h lambda|``: GMRES on a symmetric-like spread needs about
  ``sqrt(kappa) log(2 / tol)`` products, however the spread is distributed;
* the products :class:`rodflow_jax._integrate.KrylovGMRES` takes (the solver's own rtol 1e-2 and
  scaling ``atol + rtol |y|``, a random right-hand side), plain and with the exact eigenvectors
  of the ``k`` largest-modulus eigenvalues deflated (a conjugate pair counted once; a right
  preconditioner ``P = I + U (T^-1 - I) U^T``, ``U`` an orthonormal basis of them, ``T = U^T A U``):
  a bound on what any Krylov recycling (GCRO-DR, a deflated restart) could gain with a
  ``k``-vector subspace.

    python benchmarks/stiff_spectrum.py --problem mlp-digits --optimizer scalar_adam \\
        --times 150,300,450,600 --out benchmarks/results/stiff_spectrum_mlp_scalar_adam.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import lineax as lx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stiff_growth as G  # noqa: E402  (the start state and the windowed solve)

import rodflow_jax as rf  # noqa: E402
from rodflow_jax import _integrate as I  # noqa: E402
from rodflow_jax.experiments import write_json  # noqa: E402

GAMMA = 0.26  # Kvaerno5's diagonal coefficient (all five implicit stages)


def _deflator(J, lam, X, gamma_h, k):
    """The right preconditioner that deflates the ``k`` largest-modulus eigenvalues of ``J``
    (exactly: ``lam, X = eig(J)``), as a function on flat vectors; identity for k = 0."""
    if k == 0:
        return lambda x: x
    order = np.argsort(-np.abs(lam))
    order = order[lam[order].imag >= 0][:k]  # one of each conjugate pair: its real and imaginary parts span both
    top = X[:, order]
    cols = np.concatenate([top.real, top.imag[:, np.abs(lam[order].imag) > 0]], axis=1)
    u, sv, _ = np.linalg.svd(cols, full_matrices=False)  # an orthonormal basis, dropping near-dependent columns
    U = u[:, sv > 1e-8 * sv[0]]
    A_U = U - gamma_h * (J @ U)
    gain = jnp.asarray(np.linalg.inv(U.T @ A_U) - np.eye(U.shape[1]))
    U = jnp.asarray(U)
    return lambda x: x + U @ (gain @ (U.T @ x))


def gmres_products(J, lam, X, gamma_h, b, scale, k, rtol=1e-2, cap=400):
    """Products KrylovGMRES takes on ``A P`` (``P`` deflating ``k`` eigenvectors) to ``rtol``."""
    P = _deflator(J, lam, X, gamma_h, k)
    Jj = jnp.asarray(J)
    op = lx.FunctionLinearOperator(lambda x: (lambda p: p - gamma_h * (Jj @ p))(P(x)),
                                   jax.ShapeDtypeStruct(b.shape, b.dtype))
    sol = lx.linear_solve(op, b, I.KrylovGMRES(rtol, 0.0, cap), options={"scale": scale}, throw=False)
    return int(sol.stats["num_steps"]) if sol.result == lx.RESULTS.successful else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", default="mlp-digits")
    ap.add_argument("--optimizer", default="scalar_adam")
    ap.add_argument("--times", default="150,300,450,600", help="simulated steps at which to look")
    ap.add_argument("--deflate", default="0,16,64,256", help="numbers of deflated eigenvectors")
    ap.add_argument("--max-n", type=int, default=8000, help="largest state for a dense Jacobian")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    flow, y, K = G.stable_flow_at_start(rf.get_problem(args.problem), args.optimizer)
    yf, unravel = jax.flatten_util.ravel_pytree(y)
    n = yf.size
    if n > args.max_n:
        raise SystemExit(f"state size {n} > --max-n {args.max_n}: the dense Jacobian would not fit")
    cfg = I.stiff_solver(jnp.float64)
    times = [int(t) for t in args.times.split(",")]
    deflate = [int(k) for k in args.deflate.split(",")]
    window = G.windowed_solve(flow, cfg, max(b - a for a, b in zip([K] + times, times)))

    @jax.jit
    def jacobian(yf, t):
        _, lin = jax.linearize(lambda v: jax.flatten_util.ravel_pytree(flow.vector_field(t, unravel(v), None))[0], yf)
        return jax.vmap(lin)(jnp.eye(n, dtype=yf.dtype)).T

    rows = []
    out = {"machine": {"platform": platform.platform(), "device": str(jax.devices()[0])},
           "problem": args.problem, "optimizer": args.optimizer, "start_step": K, "state_size": n,
           "gamma": GAMMA, "krylov_rtol": 1e-2, "rows": rows}
    print(f"{args.problem} / {args.optimizer}: state size {n}, start step {K}")
    print("| step | h | max gamma h |lambda| | stiff eigenvalues (gamma h |lambda| > 1) | sqrt(kappa) | "
          + " | ".join(f"GMRES products, {k} deflated" for k in deflate) + " |")
    print("|---|---|---|---|---|" + "---|" * len(deflate))
    t_prev = K
    for t in times:
        w0 = time.perf_counter()
        y, ns, nr, res, _ = jax.block_until_ready(window(y, float(t_prev), float(t)))
        if I.result_message(int(res)):
            print(f"solve stopped before step {t}: {I.result_message(int(res))}")
            break
        h_mean = (t - t_prev) / max(int(ns) - int(nr), 1)
        yf = jax.flatten_util.ravel_pytree(y)[0]
        J = np.asarray(jacobian(yf, float(t)))
        lam, X = np.linalg.eig(J)
        scale = cfg.atol + cfg.rtol * jnp.abs(yf)
        b = jax.random.normal(jax.random.PRNGKey(t), (n,), yf.dtype)
        for h in (h_mean, 2 * h_mean):
            gh = GAMMA * h
            products = {k: gmres_products(J, lam, X, gh, b, scale, k) for k in deflate}
            row = dict(step=t, h=h, max_gamma_h_lambda=float(gh * np.abs(lam).max()),
                       stiff_eigenvalues=int((gh * np.abs(lam) > 1).sum()),
                       sqrt_kappa=float(np.sqrt(np.abs(1 - gh * lam).max())),
                       max_imag_over_max_abs=float(np.abs(lam.imag).max() / np.abs(lam).max()),
                       gmres_products={str(k): v for k, v in products.items()},
                       solver_steps=int(ns), rejected=int(nr), wall_s=time.perf_counter() - w0)
            rows.append(row)
            print(f"| {t} | {h:.2f} | {row['max_gamma_h_lambda']:.0f} | {row['stiff_eigenvalues']} | "
                  f"{row['sqrt_kappa']:.1f} | " + " | ".join(str(products[k]) for k in deflate) + " |", flush=True)
        if args.out:
            write_json(args.out, out)
        t_prev = t
    return out


if __name__ == "__main__":
    main()
