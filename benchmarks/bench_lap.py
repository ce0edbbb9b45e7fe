"""Benchmark: jitted auction LAP vs scipy (and LAPJV, optax Hungarian) in one run.

  python benchmarks/bench_lap.py --sizes=1536,4096,11008 --kinds=random,nearperm \
      --json=/tmp/bench_lap.json --max_seconds=120

For each size and cost kind it times every solver on the same matrix (auction after a warm-up
call that compiles it, results blocked on), checks the objective against scipy, and reports
seconds and the ratio to scipy measured in the same run. Solvers whose expected time exceeds
``--max_seconds`` (extrapolated from the previous size, O(n^3)) are skipped with a note.

Cost kinds:
  random    uniform [0, 1) costs (independent models look like this after any matching).
  nearperm  negative cosine similarity of correlated Gaussian features with a hidden
            permutation: rows of B are a permuted, noisy copy of rows of A (dependent models).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402

from jaxind import assignment  # noqa: E402


def make_cost(kind: str, n: int, seed: int, dim: int = 256, noise: float = 1.0):
    """(n, n) float32 cost and the planted permutation (None for random)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.random((n, n), dtype=np.float32), None
    if kind == "nearperm":
        x = rng.standard_normal((n, dim), dtype=np.float32)
        perm = rng.permutation(n)
        y = x[perm] + noise * rng.standard_normal((n, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        return -(x @ y.T), np.argsort(perm)
    raise ValueError(f"unknown cost kind {kind!r}")


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1536,4096,11008")
    p.add_argument("--kinds", default="random,nearperm")
    p.add_argument("--solvers", default="scipy,lapjv,auction,hungarian")
    p.add_argument(
        "--max_seconds", type=float, default=120.0, help="skip a solver whose extrapolated time exceeds this"
    )
    p.add_argument(
        "--hungarian_max_n", type=int, default=4096, help="optax Hungarian only up to this n (sequential loops)"
    )
    p.add_argument("--block", type=int, default=0, help="auction block (0: backend default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_lap.json", help="where to write the results")
    args = p.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    solvers = [s for s in args.solvers.split(",") if s]
    try:
        import lap  # noqa: F401

        have_lapjv = True
    except ImportError:
        have_lapjv = False
    device = str(jax.devices()[0])
    print(
        f"backend={jax.default_backend()} device={device} jax={jax.__version__} "
        f"lapjv={'yes' if have_lapjv else 'not installed'}"
    )
    results = []
    last_time: dict[tuple[str, str], tuple[int, float]] = {}

    def too_slow(solver, kind, n):
        if (solver, kind) not in last_time:
            return False
        n0, t0 = last_time[(solver, kind)]
        return t0 * (n / n0) ** 3 > args.max_seconds

    for n in sizes:  # sizes outer: a run cut short still has every kind at the small sizes
        for kind in kinds:
            cost, planted = make_cost(kind, n, args.seed)
            c64 = cost.astype(np.float64)
            row = {"kind": kind, "n": n, "device": device, "backend": jax.default_backend()}
            (r_ref, c_ref), t_ref = timed(scipy.optimize.linear_sum_assignment, c64)
            obj_ref = float(c64[r_ref, c_ref].sum())
            row["scipy"] = {"seconds": t_ref, "objective": obj_ref, "ratio_vs_scipy": 1.0}
            if planted is not None:
                row["scipy"]["planted_recovered"] = float(np.mean(c_ref == planted))
            for solver in solvers:
                if solver == "scipy":
                    continue
                if solver == "lapjv" and not have_lapjv:
                    continue
                if solver == "hungarian" and n > args.hungarian_max_n:
                    print(f"  note: optax hungarian skipped at n={n} (> --hungarian_max_n)")
                    row[solver] = {"skipped": f"n > {args.hungarian_max_n}"}
                    continue
                if too_slow(solver, kind, n):
                    print(f"  note: {solver} skipped at n={n} {kind} (extrapolated > {args.max_seconds}s)")
                    row[solver] = {"skipped": "extrapolated time > max_seconds"}
                    continue
                entry = {}
                if solver == "lapjv":
                    import lap

                    (_, x, _), t = timed(lap.lapjv, c64)
                    cols = np.asarray(x)
                elif solver == "hungarian":
                    from optax import assignment as optax_assignment

                    dev = jnp.asarray(cost)
                    fn = jax.jit(optax_assignment.hungarian_algorithm).lower(dev).compile()
                    (r, x), t = timed(lambda c, fn=fn: jax.block_until_ready(fn(c)), dev)
                    cols = np.empty(n, np.int64)
                    cols[np.asarray(r)] = np.asarray(x)
                else:  # auction: compile on the same shape first, then time
                    dev = jax.device_put(jnp.asarray(cost))
                    dev.block_until_ready()
                    block = args.block or None
                    _, tc = timed(assignment.solve_auction, dev, False, 1e-6, block, 200_000)
                    (cols, info), t = timed(assignment.solve_auction, dev, False, 1e-6, block, 200_000)
                    entry.update(first_call_seconds=tc, info=info)
                cols = np.asarray(cols)
                obj = float(c64[np.arange(n), cols].sum())
                entry.update(
                    seconds=t,
                    objective=obj,
                    ratio_vs_scipy=t / t_ref,
                    rel_err=abs(obj - obj_ref) / max(abs(obj_ref), 1e-300),
                    same_assignment=bool(np.array_equal(cols, c_ref)),
                )
                last_time[(solver, kind)] = (n, t)
                row[solver] = entry
            last_time[("scipy", kind)] = (n, t_ref)
            results.append(row)
            line = f"{kind:9s} n={n:6d}  scipy {t_ref:8.3f}s"
            for solver in solvers:
                e = row.get(solver)
                if solver == "scipy" or not e:
                    continue
                if "skipped" in e:
                    line += f" | {solver} skipped"
                else:
                    line += (
                        f" | {solver} {e['seconds']:8.3f}s x{e['ratio_vs_scipy']:.2f}"
                        f" relerr={e['rel_err']:.1e} same={e['same_assignment']}"
                    )
            print(line, flush=True)
            with open(args.json, "w") as f:  # rewrite after each size: partial runs survive
                json.dump({"device": device, "results": results}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
