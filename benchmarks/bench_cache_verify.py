"""What verifying the cache costs: the MATCH CLI with a warm model cache, this checkout against a baseline
checkout (before checksums), runs alternated in one process so both see the same machine load.

The pair and command line are bench_limits.py's (SmolLM2 GGUF against a noised jaxind copy, ``--tests=match
--num_sequences=8 --seq_len=128``). Each checkout has its own jaxind cache under ``--work_dir`` and runs once
to fill it (conversion, compilation); then ``--runs`` timed runs each, alternated. Reported: best and median
wall seconds, the model loads (where verification happens), their ratio, and that the p-values agree.
Also, in this process: reading SmolLM2's stored param tree with every checksum verified against reading it
with the checksums already verified (the per-process memo), i.e. the CRC-32 pass alone.

    python benchmarks/bench_cache_verify.py --baseline_root /tmp/base --output benchmarks/results/cache_verify.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_limits import _cli_match, _noised_copy  # noqa: E402


def _summary(runs: list[dict]) -> dict:
    walls = [r["wall"] for r in runs]
    loads = [r["breakdown"]["load_model_a"] + r["breakdown"]["load_model_b"] for r in runs]
    median = statistics.median
    return {"walls": walls, "best": min(walls), "median": median(walls), "loads_median": median(loads)}


def _verify_cost(cache: str) -> dict:
    """Seconds to read SmolLM2's stored tree verifying every leaf, and with the checksums remembered."""
    import jax

    from jaxind.io import disk_cache
    from jaxind.many import modelstore

    stored, _ = modelstore.ensure("a", "smollm2", cache_root=cache)
    folder = os.path.join(stored.folder, "weights")
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(disk_cache.load_tree(folder)))
    verified, remembered = [], []
    for _ in range(3):
        disk_cache._verified.clear()
        start = time.perf_counter()
        disk_cache.load_tree(folder)
        verified.append(time.perf_counter() - start)
        start = time.perf_counter()
        disk_cache.load_tree(folder)
        remembered.append(time.perf_counter() - start)
    crc = min(verified) - min(remembered)
    rate = nbytes / crc / 1e9
    return {"bytes": nbytes, "verified_s": min(verified), "remembered_s": min(remembered), "crc_gb_per_s": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--baseline_root", required=True, help="checkout of the code before (git worktree)")
    parser.add_argument("--work_dir", default="/tmp/jaxind_bench_cache")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    noised = os.path.join(args.work_dir, "smollm2_noised")
    _noised_copy(noised, 0.01)
    roots = {"after": ROOT, "before": args.baseline_root}
    envs = {k: {**os.environ, "JAXIND_CACHE": os.path.join(args.work_dir, f"cache_{k}")} for k in roots}
    out = os.path.join(args.work_dir, "match.json")
    first = {k: _cli_match(noised, out, envs[k], roots[k]) for k in roots}
    runs: dict[str, list[dict]] = {k: [] for k in roots}
    for _ in range(args.runs):
        for k in roots:
            runs[k].append(_cli_match(noised, out, envs[k], roots[k]))
    result = {
        "benchmark": "match_cli_warm_cache_verify",
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "first": first,
        **{k: _summary(v) for k, v in runs.items()},
        "same_log10_pvalue": len({r["log10_pvalue"] for v in runs.values() for r in v}) == 1,
        "verify_in_process": _verify_cost(envs["after"]["JAXIND_CACHE"]),
    }
    result["ratio_median"] = result["after"]["median"] / result["before"]["median"]
    result["ratio_best"] = result["after"]["best"] / result["before"]["best"]
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    b, a, v = result["before"], result["after"], result["verify_in_process"]
    print(f"MATCH CLI, warm cache, {args.runs} runs each: before {b['best']:.2f} s best / {b['median']:.2f} s median")
    print(f"  after {a['best']:.2f} s best / {a['median']:.2f} s median; ratio {result['ratio_median']:.3f} (median)")
    print(f"  model loads (median): before {b['loads_median']:.2f} s, after {a['loads_median']:.2f} s")
    print(f"  same p-value: {result['same_log10_pvalue']}; verifying {v['bytes'] / 1e6:.0f} MB in process:")
    print(f"  {v['verified_s']:.3f} s vs {v['remembered_s']:.3f} s remembered ({v['crc_gb_per_s']:.2f} GB/s)")


if __name__ == "__main__":
    main()
