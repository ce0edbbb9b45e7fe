"""PERMTEST-L2 against the machine's memory speed, and MATCH end to end, on the real SmolLM2 pair, in one run.

The pair: the real SmolLM2-135M-Instruct GGUF (``smollm2``) and a noised copy of it (every weight moved by
``--noise`` x N(0, 1), a fine-tune stand-in) written once as a jaxind checkpoint under ``--work_dir``.

MATCH: the whole command line, ``python -m jaxind.main --model_a=smollm2 --model_b=<noised copy> --tests=match
--num_sequences=8 --seq_len=128``, as a child process with the jaxind cache in ``--work_dir`` (converted models
and compiled kernels kept between runs, as for a user running it again). The first run is reported apart (it
converts both models and may compile); then ``--match_runs`` runs, best and median wall seconds. The
breakdown is the results JSON's own ``timing`` (load of each model, tokens, the test, trace, compile) and
MATCH's ``seconds_pass``, ``seconds_grams``, ``seconds_lap``; "startup" is the rest of the wall time (Python,
imports, flags, writing the report).

PERMTEST-L2 (in this process, after the MATCH runs): a draw must read both models' MLP stacks (gate, up,
down^T: ``2 L 3 d h`` float32) and one Gram entry per residual row per layer; that is the byte count per draw.
The machine's copy bandwidth is measured in the same run on a buffer of the same size (numpy ``copyto`` into a
preallocated buffer: bytes copied per second, i.e. each byte read once and written once), before and after the
kernel. Rates: the kernel's steady draws per second (its jitted draw function on chunks of ``CPU_L2_CHUNK``
draws, constants already built; also its CPU seconds per draw and the cores it kept busy, which depend less
on what else runs on the machine) and a whole ``permtest`` call (constants, draws, observed statistic); the loop
(``permtest_loop``: each draw materialises ``p_t(B)``) likewise. The fraction reached is
``bytes per draw x draws per second / copy bandwidth``. Kernel and loop draws are checked to agree
(same ``fold_in(key, t)`` draws: statistics to float rounding, identical counts ``stat_t >= stat_0``).

    python benchmarks/bench_limits.py --output benchmarks/results/limits_cpu.json [--work_dir DIR] \
        [--baseline_root CHECKOUT]

``--baseline_root``: the same MATCH command line from another checkout (e.g. ``git archive`` of the commit
before), same cache, in the same run; its p-value must equal this checkout's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="path of the JSON result")
    parser.add_argument("--work_dir", default="/tmp/jaxind_bench_limits", help="jaxind cache and the noised copy")
    parser.add_argument("--noise", type=float, default=0.01, help="absolute noise of the copy per weight")
    parser.add_argument("--match_runs", type=int, default=2, help="timed CLI runs after the first")
    parser.add_argument("--kernel_perms", type=int, default=64, help="draws of the timed permtest call")
    parser.add_argument("--kernel_chunks", type=int, default=6, help="chunks timed for the steady draw rate")
    parser.add_argument("--loop_perms", type=int, default=8, help="draws of the timed loop call")
    parser.add_argument("--skip_match", action="store_true", help="PERMTEST only")
    parser.add_argument(
        "--baseline_root", default=None, help="also time the MATCH CLI of this checkout (e.g. the code before)"
    )
    return parser.parse_args()


def _noised_copy(path: str, noise: float) -> None:
    """Writes SmolLM2 + ``noise`` N(0, 1) per weight as a jaxind checkpoint at ``path`` (once)."""
    if os.path.isdir(path):
        return
    import jax
    import numpy as np

    from converters.checkpoint import groups_of, save_checkpoint
    from converters.sources import load_model

    model = load_model("smollm2")
    leaves, tree = jax.tree.flatten(model.params)
    rng = np.random.default_rng(0)
    noisy = [np.asarray(w) + noise * rng.standard_normal(w.shape, dtype=np.float32) for w in leaves]
    save_checkpoint(path, model.config, groups_of(jax.tree.unflatten(tree, noisy)), {"source": "smollm2+noise"})


def _cli_match(noised: str, out: str, env: dict[str, str], root: str = ROOT) -> dict:
    argv = [sys.executable, "-m", "jaxind.main", "--model_a=smollm2", f"--model_b={noised}", "--tests=match"]
    argv += ["--num_sequences=8", "--seq_len=128", f"--output={out}"]
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=root, env={**env, "PYTHONPATH": root})
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"error: the MATCH run failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        doc = json.load(f)
    test = doc["tests"]["match"]
    if "timing" not in doc:  # a checkout from before the timing record
        return {"wall": wall, "test_seconds": test["seconds"], "log10_pvalue": test["log10_pvalue"]}
    timing = doc["timing"]
    parts = {
        "load_model_a": timing["load_model_a"],
        "load_model_b": timing["load_model_b"],
        "tokens": timing["tokens"],
        "pass": test["seconds_pass"],
        "grams": test["seconds_grams"],
        "laps": test["seconds_lap"],
        "trace": timing["trace"],
        "compile": timing["compile"],
    }
    accounted = timing["load_model_a"] + timing["load_model_b"] + timing["tokens"] + timing["test_match"]
    return {"wall": wall, "breakdown": parts, "startup": wall - accounted, "log10_pvalue": test["log10_pvalue"]}


def bench_match(args: argparse.Namespace, noised: str, env: dict[str, str]) -> dict:
    out = os.path.join(args.work_dir, "match.json")
    first = _cli_match(noised, out, env)
    runs = [_cli_match(noised, out, env) for _ in range(args.match_runs)]
    best = min(runs, key=lambda r: r["wall"])
    if len({r["log10_pvalue"] for r in [first, *runs]}) != 1:
        raise SystemExit("error: MATCH p-values differ between runs")
    baseline = None
    if args.baseline_root:
        base = [_cli_match(noised, out, env, args.baseline_root) for _ in range(1 + args.match_runs)]
        baseline = {
            "root": args.baseline_root,
            "first_run": base[0],
            "runs_wall": [r["wall"] for r in base[1:]],
            "best_wall": min(r["wall"] for r in base[1:]),
            "same_log10_pvalue": all(r["log10_pvalue"] == first["log10_pvalue"] for r in base),
        }
    return {
        "baseline": baseline,
        "first_run": first,
        "runs_wall": [r["wall"] for r in runs],
        "best_wall": best["wall"],
        "median_wall": statistics.median(r["wall"] for r in runs),
        "best_run": best,
    }


def _copy_bandwidth(nbytes: int, repeats: int = 3) -> float:
    """Median bytes copied per second by numpy ``copyto`` of an ``nbytes`` float32 buffer into another."""
    import numpy as np

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        rates.append(nbytes / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_permtest(args: argparse.Namespace, noised: str) -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxind.many import modelstore
    from jaxind.stats import permtest as pt

    a = modelstore.on_device(modelstore.ensure("a", "smollm2")[0].load())
    b = modelstore.on_device(modelstore.ensure("b", noised)[0].load())
    cfg = a.config
    key = jax.random.key(42)
    k = 2 if not cfg.glu else 3
    mlp_bytes = 2 * cfg.n_layers * k * cfg.d_model * cfg.d_ff * 4
    bytes_per_draw = mlp_bytes + cfg.n_layers * cfg.d_model * 4  # + one Gram entry per residual row per layer
    copy_before = _copy_bandwidth(bytes_per_draw)

    # The kernel's steady draw rate: its jitted draw function on chunks, constants built once.
    mesh = pt.make_mesh(jax.devices()[:1])
    consts = jax.block_until_ready(pt._place_consts("l2", a.params, b.params, cfg, None, mesh))
    fn = pt._sharded_draws("l2", cfg, mesh)
    key_data = jax.device_put(jax.random.key_data(key), NamedSharding(mesh, P()))
    chunk = pt.CPU_L2_CHUNK if jax.default_backend() == "cpu" else 256
    jax.block_until_ready(fn(consts, key_data, np.arange(chunk, dtype=np.int32)))  # compile
    start, cpu_start = time.perf_counter(), time.process_time()
    for c in range(args.kernel_chunks):
        jax.block_until_ready(fn(consts, key_data, np.arange(c * chunk, (c + 1) * chunk, dtype=np.int32)))
    kernel_wall, kernel_cpu = time.perf_counter() - start, time.process_time() - cpu_start
    kernel_steady = args.kernel_chunks * chunk / kernel_wall
    del consts

    # Whole calls (second call of each: compiled).
    def kernel_call():
        return pt.permtest(
            a.params, cfg, b.params, cfg, key=key, num_perms=args.kernel_perms, devices=jax.devices()[:1]
        )

    def loop_call():
        return pt.permtest_loop(a.params, cfg, b.params, cfg, key=key, num_perms=args.loop_perms)

    kernel_call()
    start = time.perf_counter()
    kern = kernel_call()
    kernel_call_s = time.perf_counter() - start
    loop_call()
    start = time.perf_counter()
    loop = loop_call()
    loop_call_s = time.perf_counter() - start
    # The loop's steady per-draw rate: its jitted step alone.
    step = pt._loop_step("l2", cfg)
    jax.block_until_ready(step(a.params, b.params, key, 0, None))
    start = time.perf_counter()
    jax.block_until_ready([step(a.params, b.params, key, t, None) for t in range(args.loop_perms)])
    loop_steady = args.loop_perms / (time.perf_counter() - start)
    copy_after = _copy_bandwidth(bytes_per_draw)

    n = args.loop_perms
    rel = float(np.max(np.abs(kern.stats[:n] - loop.stats[:n]) / np.abs(loop.stats[:n])))
    same_counts = bool(np.array_equal(kern.stats[:n] >= kern.stat0, loop.stats[:n] >= loop.stat0))
    copy_bw = 0.5 * (copy_before + copy_after)
    return {
        "model": {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_ff": cfg.d_ff, "params": cfg.num_params()},
        "bytes_per_draw": bytes_per_draw,
        "copy_bandwidth_bytes_per_s": {"before": copy_before, "after": copy_after, "mean": copy_bw},
        "kernel": {
            "steady_perms_per_s": kernel_steady,
            "steady_cpu_seconds_per_draw": kernel_cpu / (args.kernel_chunks * chunk),
            "steady_cores_busy": kernel_cpu / kernel_wall,
            "chunk": chunk,
            "call_perms": args.kernel_perms,
            "call_seconds": kernel_call_s,
            "call_perms_per_s": args.kernel_perms / kernel_call_s,
            "fraction_of_copy_bandwidth": bytes_per_draw * kernel_steady / copy_bw,
            "call_fraction_of_copy_bandwidth": bytes_per_draw * args.kernel_perms / kernel_call_s / copy_bw,
        },
        "loop": {
            "steady_perms_per_s": loop_steady,
            "call_perms": args.loop_perms,
            "call_seconds": loop_call_s,
            "call_perms_per_s": args.loop_perms / loop_call_s,
        },
        "speedup_steady": kernel_steady / loop_steady,
        "max_rel_stat_diff_kernel_vs_loop": rel,
        "same_counts_kernel_vs_loop": same_counts,
        "pvalue": kern.pvalue,
    }


def main() -> None:
    args = _parse()
    os.makedirs(args.work_dir, exist_ok=True)
    cache = os.path.join(args.work_dir, "cache")
    os.environ["JAXIND_CACHE"] = cache
    env = {**os.environ, "PYTHONPATH": ROOT, "JAXIND_CACHE": cache}
    sys.path.insert(0, ROOT)
    noised = os.path.join(args.work_dir, "smollm2_noised")
    _noised_copy(noised, args.noise)
    load = os.getloadavg()
    match = None if args.skip_match else bench_match(args, noised, env)
    perm = bench_permtest(args, noised)
    import jax

    out = {
        "benchmark": "permtest_l2_memory_speed_and_match_cli",
        "pair": f"smollm2 vs smollm2 + {args.noise} N(0,1) per weight",
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "load_average_start": load,
        "load_average_end": os.getloadavg(),
        "jax": jax.__version__,
        "permtest_l2": perm,
        "match_cli": match,
    }
    gb = 1e9
    k, lp = perm["kernel"], perm["loop"]
    print(f"PERMTEST-L2, SmolLM2 pair, {jax.devices()[0].device_kind}, {os.cpu_count()} cores, load {load[0]:.1f}")
    copy_bw = perm["copy_bandwidth_bytes_per_s"]["mean"]
    print(f"  bytes per draw {perm['bytes_per_draw'] / 1e6:.0f} MB; copy bandwidth {copy_bw / gb:.2f} GB/s")
    print(
        f"  kernel: {k['steady_perms_per_s']:.2f} perms/s steady "
        f"({k['fraction_of_copy_bandwidth']:.0%} of copy bandwidth; {k['steady_cpu_seconds_per_draw'] * 1e3:.0f} "
        f"CPU ms per draw on {k['steady_cores_busy']:.2f} cores); "
        f"whole call {k['call_perms_per_s']:.2f} perms/s ({k['call_perms']} draws in {k['call_seconds']:.2f} s)"
    )
    print(
        f"  loop:   {lp['steady_perms_per_s']:.2f} perms/s steady; whole call {lp['call_perms_per_s']:.2f} perms/s "
        f"({lp['call_perms']} draws in {lp['call_seconds']:.2f} s)"
    )
    print(
        f"  kernel vs loop: {perm['speedup_steady']:.1f}x; "
        f"max rel. stat diff {perm['max_rel_stat_diff_kernel_vs_loop']:.1e}; "
        f"same counts: {perm['same_counts_kernel_vs_loop']}"
    )
    if match is not None:
        best = match["best_run"]
        parts = ", ".join(f"{name} {sec:.2f}" for name, sec in best["breakdown"].items())
        print(
            f"MATCH CLI: {match['best_wall']:.2f} s best, "
            f"{match['median_wall']:.2f} s median of {len(match['runs_wall'])} "
            f"(first run {match['first_run']['wall']:.2f} s); log10 p {best['log10_pvalue']:.1f}"
        )
        print(f"  breakdown (s): {parts}, startup {best['startup']:.2f}")
        if match["baseline"] is not None:
            base = match["baseline"]
            print(
                f"  baseline {base['root']}: {base['best_wall']:.2f} s best of {len(base['runs_wall'])} "
                f"(first run {base['first_run']['wall']:.2f} s); same p-value: {base['same_log10_pvalue']}"
            )
    tmp = args.output + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
