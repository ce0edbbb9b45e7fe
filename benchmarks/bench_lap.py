"""Benchmark: the LAP solvers on synthetic and on real MATCH costs, all in one run.

  python benchmarks/bench_lap.py --sizes=1536,4096,11008 --kinds=random,nearperm \
      --json=/tmp/bench_lap.json --max_seconds=120
  python benchmarks/bench_lap.py --kinds=real --repeats=3 --json=/tmp/bench_lap_real.json

For each cost matrix it times every solver on the same matrix (jitted solvers after a warm-up
call at that shape, results blocked on), checks the objective against scipy's, and reports the
median seconds over ``--repeats`` (solver order rotated between repeats) and the ratio to scipy's
median from the same run. Solvers whose expected time exceeds ``--max_seconds`` (extrapolated
from the previous size, O(n^3)) are skipped with a note.

Cost kinds:
  random    uniform [0, 1) costs.
  nearperm  negative cosine similarity of correlated Gaussian features with a hidden
            permutation: rows of B are a permuted, noisy copy of rows of A (dependent models).
  real      MATCH's gate and up distance matrices (h x h = 1,536 x 1,536) from the real
            SmolLM2-135M GGUF: "indep" against an independently initialised model of the same
            config (seed 1), "trained" against the same GGUF one layer further on (two trained
            unit sets that are not permutations of each other), on ``--real_tokens`` random
            token sequences of 128 (the CLI's default data kind). Built with the public API
            (converters.sources.load_model, jaxind.stats.grams) and cached as .npy under
            ``--cache_dir``; ``--sizes`` does not apply.

Jitted entry point (``--mode=jit``): ``jax.jit(assignment.lap)`` against the host solvers (scipy,
LAPJV, ``solve_lap``'s "auto") at ``--jit_sizes`` (default 64, 512, 2048) on random and
near-permutation costs, and ``jax.jit(jax.vmap(lap))`` against ``solve_lap_batched`` and a scipy loop
on ``--batch`` x 512 x 512 costs (default 8), all in one run, medians of ``--repeats``, each result
checked against scipy (exact: same float64 total). ``--jit_auction_max_n`` also times
``lap(method="auction")`` (the accelerators' path) up to that n.

  python benchmarks/bench_lap.py --mode=jit --repeats=5 --json=/tmp/bench_lap_jit.json

Solvers: scipy, lapjv_raw (the ``lap`` package called directly: the path before the exactness
fix), lapjv (jaxind's call: row-reduced and scaled, exact), warm (jaxind's "warm"), auction
(the certified jitted auction), hungarian (optax).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402

from jaxind.stats import assignment  # noqa: E402

REAL_LAYERS = (0, 10, 20, 28)


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


def real_costs(cache_dir: str, layers: tuple[int, ...], num_sequences: int) -> list[tuple[str, np.ndarray]]:
    """MATCH's gate/up distance matrices of SmolLM2 vs an independent init and vs itself one layer on."""
    os.makedirs(cache_dir, exist_ok=True)
    pairs = {"indep": tuple((la, la) for la in layers), "trained": tuple((la, la + 1) for la in layers)}
    names = [f"{kind}_L{a}-{b}_{proj}" for kind, ps in pairs.items() for a, b in ps for proj in ("gate", "up")]
    path = lambda name: os.path.join(cache_dir, f"smollm2_{num_sequences}x128_{name}.npy")  # noqa: E731
    if not all(os.path.exists(path(name)) for name in names):
        from converters.sources import load_model
        from jaxind.io import token_source
        from jaxind.io.assets import smollm2_gguf
        from jaxind.models import model
        from jaxind.stats import grams

        smol = load_model(smollm2_gguf())
        cfg = smol.config
        tokens = token_source.make_tokens(
            token_source.DataSpec(num_sequences=num_sequences, seq_len=128), cfg.vocab_size, cfg.vocab_size
        )
        batches = list(token_source.batches(tokens, 8))
        others = {"indep": model.init_params(cfg, jax.random.key(1)), "trained": smol.params}
        for kind, ps in pairs.items():
            la = tuple(sorted({a for a, _ in ps}))
            lb = tuple(sorted({b for _, b in ps}))
            index = tuple((la.index(a), lb.index(b)) for a, b in ps)
            stats = grams.accumulate(
                smol.params, cfg, others[kind], cfg, batches, layers_a=la, layers_b=lb, pair_index=index
            )
            for p, (a, b) in enumerate(ps):
                for proj in ("gate", "up"):
                    np.save(path(f"{kind}_L{a}-{b}_{proj}"), stats.distances(p, proj))
    return [(name, np.load(path(name))) for name in names]


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def run_solver(solver: str, cost: np.ndarray, block: int | None):
    """Returns (col_of_row, info or None) for an (n, n) cost."""
    n = cost.shape[0]
    if solver == "scipy":
        return scipy.optimize.linear_sum_assignment(cost)[1], None
    if solver == "lapjv_raw":
        import lap

        return np.asarray(lap.lapjv(cost)[1]), None
    if solver == "lapjv":
        return assignment.lapjv_exact(np.array(cost, np.float64)), None
    if solver == "warm":
        return assignment.solve_warm(cost)
    if solver == "auction":
        return assignment.solve_auction(jnp.asarray(cost, jnp.float32), False, 1e-6, block, 200_000)
    if solver == "hungarian":
        from optax import assignment as optax_assignment

        r, x = jax.block_until_ready(jax.jit(optax_assignment.hungarian_algorithm)(jnp.asarray(cost)))
        cols = np.empty(n, np.int64)
        cols[np.asarray(r)] = np.asarray(x)
        return cols, None
    raise ValueError(f"unknown solver {solver!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1536,4096,11008")
    p.add_argument("--kinds", default="random,nearperm", help="random, nearperm, real")
    p.add_argument("--solvers", default="scipy,lapjv_raw,lapjv,warm,auction,hungarian")
    p.add_argument("--repeats", type=int, default=1, help="timings per solver and cost; medians are reported")
    p.add_argument(
        "--max_seconds", type=float, default=120.0, help="skip a solver whose extrapolated time exceeds this"
    )
    p.add_argument(
        "--hungarian_max_n", type=int, default=4096, help="optax Hungarian only up to this n (sequential loops)"
    )
    p.add_argument("--block", type=int, default=0, help="auction block (0: backend default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real_layers", default=",".join(map(str, REAL_LAYERS)), help="layers for --kinds=real")
    p.add_argument("--real_tokens", type=int, default=8, help="sequences of 128 random tokens for --kinds=real")
    p.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "jaxind_lap_cache"))
    p.add_argument("--json", default="bench_lap.json", help="where to write the results")
    p.add_argument("--mode", default="solvers", choices=("solvers", "jit"), help="jit: the jitted lap entry point")
    p.add_argument("--jit_sizes", default="64,512,2048")
    p.add_argument("--batch", type=int, default=8, help="--mode=jit: batch of 512 x 512 costs")
    p.add_argument("--jit_auction_max_n", type=int, default=0, help="--mode=jit: also time the auction path up to n")
    args = p.parse_args(argv)
    if args.mode == "jit":
        return bench_jit(args)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    kinds = [k for k in args.kinds.split(",") if k]
    solvers = [s for s in args.solvers.split(",") if s and s != "scipy"]
    if not assignment.have_lapjv():
        solvers = [s for s in solvers if not s.startswith("lapjv")]
    device = str(jax.devices()[0])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    print(f"backend={jax.default_backend()} device={device} jax={jax.__version__} machine={machine}")
    cases: list[tuple[str, str, np.ndarray, np.ndarray | None]] = []  # kind, name, cost, planted
    for n in sizes:  # sizes outer: a run cut short still has every kind at the small sizes
        for kind in kinds:
            if kind != "real":
                cost, planted = make_cost(kind, n, args.seed)
                cases.append((kind, f"{kind}_{n}", cost, planted))
    if "real" in kinds:
        layers = tuple(int(x) for x in args.real_layers.split(",") if x)
        for name, cost in real_costs(args.cache_dir, layers, args.real_tokens):
            cases.append(("real", name, cost, None))

    results = []
    last_time: dict[tuple[str, str], tuple[int, float]] = {}
    warmed: set[tuple[str, tuple[int, ...]]] = set()
    block = args.block or None

    def too_slow(solver, kind, n):
        if (solver, kind) not in last_time:
            return False
        n0, t0 = last_time[(solver, kind)]
        return t0 * (n / n0) ** 3 > args.max_seconds

    for kind, name, cost, planted in cases:
        n = cost.shape[0]
        c64 = cost.astype(np.float64)
        row: dict = {"kind": kind, "name": name, "n": n, "device": device, "backend": jax.default_backend()}
        row["competition"] = assignment.competition(c64)
        _, c_ref = scipy.optimize.linear_sum_assignment(c64)
        obj_ref = float(c64[np.arange(n), c_ref].sum())
        active = []
        for solver in solvers:
            if solver == "hungarian" and n > args.hungarian_max_n:
                row[solver] = {"skipped": f"n > {args.hungarian_max_n}"}
            elif too_slow(solver, kind, n):
                print(f"  note: {solver} skipped at {name} (extrapolated > {args.max_seconds}s)")
                row[solver] = {"skipped": "extrapolated time > max_seconds"}
            else:
                active.append(solver)
        for solver in active:  # compile jitted solvers at this shape before timing
            if solver in ("warm", "auction", "hungarian") and (solver, cost.shape) not in warmed:
                _, tc = timed(run_solver, solver, c64, block)
                warmed.add((solver, cost.shape))
                row.setdefault("first_call_seconds", {})[solver] = tc
        times: dict[str, list[float]] = {s: [] for s in ["scipy", *active]}
        entries: dict[str, dict] = {}
        order = ["scipy", *active]
        for rep in range(args.repeats):
            for solver in order[rep % len(order) :] + order[: rep % len(order)]:
                (cols, info), t = timed(run_solver, solver, c64, block)
                times[solver].append(t)
                cols = np.asarray(cols)
                obj = float(c64[np.arange(n), cols].sum())
                entries[solver] = {
                    "objective": obj,
                    "rel_err": abs(obj - obj_ref) / max(abs(obj_ref), 1e-300),
                    "same_assignment": bool(np.array_equal(cols, c_ref)),
                    "exact": abs(obj - obj_ref) <= 1e-12 * float(np.abs(c64).max()) * n,
                }
                if info is not None:
                    entries[solver]["info"] = info
                if planted is not None:
                    entries[solver]["planted_recovered"] = float(np.mean(cols == planted))
        t_ref = statistics.median(times["scipy"])
        for solver in order:
            t = statistics.median(times[solver])
            row[solver] = {**entries[solver], "seconds": t, "all_seconds": times[solver], "ratio_vs_scipy": t / t_ref}
            last_time[(solver, kind)] = (n, t)
        results.append(row)
        line = f"{name:22s} comp={row['competition']:.2f}  scipy {t_ref:7.3f}s"
        for solver in active:
            e = row[solver]
            flag = "" if e["exact"] else f" NOT EXACT (rel err {e['rel_err']:.1e})"
            line += f" | {solver} {e['seconds']:7.3f}s x{e['ratio_vs_scipy']:.2f}{flag}"
        print(line, flush=True)
        with open(args.json, "w") as f:  # rewritten after each cost: partial runs survive
            json.dump({"device": device, "machine": machine, "repeats": args.repeats, "results": results}, f, indent=1)
    summarise(results, ["scipy", *solvers])
    print(f"wrote {args.json}")
    return 0


def _exact(cost: np.ndarray, cols, maximize: bool = False) -> bool:
    """Same float64 total as scipy's optimum (up to summation-order rounding)."""
    c64 = np.asarray(cost, np.float64)
    r, k = scipy.optimize.linear_sum_assignment(c64, maximize=maximize)
    cols = np.asarray(cols)
    gap = abs(c64[np.arange(len(cols)), cols].sum() - c64[r, k].sum())
    return bool(gap <= 1e-12 * float(np.abs(c64).max()) * len(cols))


def _median_times(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds of each thunk (order rotated between repeats) and its last output."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs: dict = {}
    order = list(fns)
    for rep in range(repeats):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            outs[name], t = timed(fns[name])
            times[name].append(t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


def bench_jit(args) -> int:
    """--mode=jit: jax.jit(lap) and jax.jit(jax.vmap(lap)) against the host solvers, one run."""
    from jaxind.stats.assignment import lap

    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}"
    print(f"backend={jax.default_backend()} jax={jax.__version__} machine={machine}")
    one = jax.jit(lap)
    auction = jax.jit(functools.partial(lap, method="auction"))
    rows = []
    for n in [int(s) for s in args.jit_sizes.split(",") if s]:
        for kind in ("random", "nearperm"):
            cost, _ = make_cost(kind, n, args.seed)
            fns = {
                "scipy": lambda c=cost: scipy.optimize.linear_sum_assignment(c)[1],
                "solve_lap": lambda c=cost: assignment.solve_lap(c)[1],
                "jit_lap": lambda c=cost: np.asarray(one(c).assignment),
            }
            if assignment.have_lapjv():
                fns["lapjv"] = lambda c=cost: assignment.lapjv_exact(np.array(c, np.float64))
            if n <= args.jit_auction_max_n:
                fns["jit_lap_auction"] = lambda c=cost: np.asarray(auction(c).assignment)
            first = {k: timed(fns[k])[1] for k in fns if k.startswith("jit")}  # compiles
            secs, outs = _median_times(fns, args.repeats)
            row = {"case": f"{kind}_{n}", "first_call_seconds": first, "seconds": secs}
            row["ratio_vs_scipy"] = {k: v / secs["scipy"] for k, v in secs.items()}
            row["exact"] = {k: _exact(cost, v) for k, v in outs.items()}
            rows.append(row)
            print(_jit_line(row), flush=True)
    rows.append(_bench_batched(args))
    print(_jit_line(rows[-1]), flush=True)
    with open(args.json, "w") as f:
        meta = {"backend": jax.default_backend(), "machine": machine, "repeats": args.repeats}
        json.dump({**meta, "results": rows}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


def _bench_batched(args) -> dict:
    """jit(vmap(lap)) vs solve_lap_batched vs a scipy loop on (batch, 512, 512) random costs."""
    from jaxind.stats.assignment import lap

    costs = np.stack([make_cost("random", 512, args.seed + i)[0] for i in range(args.batch)])
    batched = jax.jit(jax.vmap(lap))
    fns = {
        "scipy": lambda: [scipy.optimize.linear_sum_assignment(c)[1] for c in costs],
        "solve_lap_batched": lambda: assignment.solve_lap_batched(costs)[1],
        "jit_vmap_lap": lambda: np.asarray(batched(costs).assignment),
    }
    first = {"jit_vmap_lap": timed(fns["jit_vmap_lap"])[1]}
    secs, outs = _median_times(fns, args.repeats)
    row = {"case": f"batched_{args.batch}x512", "first_call_seconds": first, "seconds": secs}
    row["ratio_vs_scipy"] = {k: v / secs["scipy"] for k, v in secs.items()}
    row["ratio_vs_solve_lap_batched"] = secs["jit_vmap_lap"] / secs["solve_lap_batched"]
    row["exact"] = {k: all(_exact(c, x) for c, x in zip(costs, v, strict=True)) for k, v in outs.items()}
    return row


def _jit_line(row: dict) -> str:
    line = f"{row['case']:18s}"
    for k, t in row["seconds"].items():
        flag = "" if row["exact"][k] else " NOT EXACT"
        line += f" | {k} {t:.4f}s x{row['ratio_vs_scipy'][k]:.2f}{flag}"
    if "ratio_vs_solve_lap_batched" in row:
        line += f" | jit/batched x{row['ratio_vs_solve_lap_batched']:.2f}"
    return line


def summarise(results: list[dict], solvers: list[str]) -> None:
    """Per kind: median over costs of each solver's seconds and of its ratio to scipy."""
    for kind in sorted({r["kind"] for r in results}):
        rows = [r for r in results if r["kind"] == kind]
        line = f"median over {len(rows)} {kind} costs:"
        for solver in solvers:
            done = [r[solver] for r in rows if solver in r and "seconds" in r[solver]]
            if done:
                secs = statistics.median(e["seconds"] for e in done)
                ratio = statistics.median(e["ratio_vs_scipy"] for e in done)
                exact = sum(e["exact"] for e in done)
                line += f" | {solver} {secs:.3f}s x{ratio:.2f} ({exact}/{len(done)} exact)"
        print(line)


if __name__ == "__main__":
    raise SystemExit(main())
