"""PERMTEST-L2 throughput: the vmapped, sharded kernel vs the plain Python loop, in one run.

Model: a SmolLM2-135M-shaped random model (30 layers, d=576, h=1536, 9 heads / 3 KV heads,
head_dim 64, vocab 49152, tied embeddings) from ``init_params``; A and B are independent.

Both paths are timed end to end for a fixed number of draws after a warm-up call with the
same shapes (so compile time is excluded): the kernel call includes its one-off precompute
(cross-Grams, MLP stacks) and the observed statistic; the loop materialises ``p_t(B)`` with
``apply_permutation`` for each draw (one jitted step per draw). The figure of merit is the
ratio of permutations per second.

Usage::

    python benchmarks/bench_permtest.py --output /tmp/bench_permtest.json \
        [--kernel_perms 256] [--loop_perms 16] [--host_devices 0]

``--host_devices N`` (N > 0) splits the CPU into N XLA devices (must be set before JAX starts;
the flag does it). On an accelerator host leave it at 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="path of the JSON result")
    parser.add_argument("--kernel_perms", type=int, default=256, help="draws timed on the kernel")
    parser.add_argument("--loop_perms", type=int, default=16, help="draws timed on the loop")
    parser.add_argument("--host_devices", type=int, default=0, help="split the CPU into N XLA devices (0: leave)")
    parser.add_argument("--memory_budget_mb", type=int, default=512, help="kernel working memory per device")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (best is kept)")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    if args.host_devices > 0:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.host_devices}"
        ).strip()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import numpy as np

    from jaxind.models.config import ModelConfig
    from jaxind.models.model import init_params
    from jaxind.stats.permtest import l2_consts, permtest, permtest_loop

    cfg = ModelConfig(
        family="llama",
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        d_ff=1536,
        tie_embeddings=True,
    )
    params_a = init_params(cfg, jax.random.key(0))
    params_b = init_params(cfg, jax.random.key(1))
    key = jax.random.key(42)
    budget = args.memory_budget_mb * 2**20

    def run_kernel(n):
        return permtest(params_a, cfg, params_b, cfg, key=key, num_perms=n, memory_budget_bytes=budget)

    def run_loop(n):
        return permtest_loop(params_a, cfg, params_b, cfg, key=key, num_perms=n)

    def timed(fn, n):
        best, result = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn(n)
            best = min(best, time.perf_counter() - start)
        return best, result

    # Warm-up with the timed shapes (compilation excluded from the timings).
    start = time.perf_counter()
    run_kernel(args.kernel_perms)
    kernel_compile = time.perf_counter() - start
    start = time.perf_counter()
    run_loop(2)
    loop_compile = time.perf_counter() - start

    kernel_s, kernel_res = timed(run_kernel, args.kernel_perms)
    # The one-off part of a kernel call (cross-Grams, MLP stacks), for reference.
    start = time.perf_counter()
    jax.block_until_ready(l2_consts(params_a, params_b, cfg))
    precompute_s = time.perf_counter() - start
    loop_s, loop_res = timed(run_loop, args.loop_perms)
    n_common = min(args.kernel_perms, args.loop_perms)
    agree = float(
        np.max(np.abs(kernel_res.stats[:n_common] - loop_res.stats[:n_common]) / np.abs(loop_res.stats[:n_common]))
    )

    kernel_rate = args.kernel_perms / kernel_s
    loop_rate = args.loop_perms / loop_s
    out = {
        "benchmark": "permtest_l2_throughput",
        "model": {
            "d_model": cfg.d_model,
            "d_ff": cfg.d_ff,
            "n_layers": cfg.n_layers,
            "vocab_size": cfg.vocab_size,
            "num_params": cfg.num_params(),
        },
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "kernel": {
            "perms": args.kernel_perms,
            "seconds": kernel_s,
            "perms_per_second": kernel_rate,
            "first_call_seconds_incl_compile": kernel_compile,
            "precompute_seconds": precompute_s,
        },
        "loop": {
            "perms": args.loop_perms,
            "seconds": loop_s,
            "perms_per_second": loop_rate,
            "first_call_seconds_incl_compile": loop_compile,
        },
        "speedup": kernel_rate / loop_rate,
        "max_rel_stat_diff_kernel_vs_loop": agree,
        "memory_budget_mb_per_device": args.memory_budget_mb,
        "repeats": args.repeats,
    }
    print(f"PERMTEST-L2 on {cfg.num_params() / 1e6:.0f}M params, {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(
        f"  kernel: {kernel_rate:10.2f} perms/s ({args.kernel_perms} draws in {kernel_s:.2f} s, "
        f"of which {precompute_s:.2f} s one-off precompute)"
    )
    print(f"  loop:   {loop_rate:10.2f} perms/s ({args.loop_perms} draws in {loop_s:.2f} s)")
    print(f"  speedup: {kernel_rate / loop_rate:.1f}x   (max rel. stat diff kernel vs loop {agree:.1e})")
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
