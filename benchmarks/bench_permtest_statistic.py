"""PERMTEST with a custom statistic: draws per second of a cosine statistic vs the built-in "l2", same model, same run.

Three statistics on one pair of independent random models (``init_params``), each through
``permtest.permtest`` (draws vmapped, chunked to the memory budget, on the default draw devices):

- ``l2``: the built-in statistic (precomputed cross-Grams and MLP stacks, no permuted model);
- ``cosine``: a plain function ``(params_a, params_b) -> scalar``, the cosine of the two flattened trees: each
  draw materialises ``p_t(B)`` with ``apply_permutation``;
- ``cosine_fast``: the same cosine as a ``PermStatistic`` fast path: ``prepare`` = L2's constants, ``draw`` =
  the cosine from L2's inner product of one draw.

Each is timed end to end (precompute, draws, observed statistic) after a warm-up call with the same shapes (so
compile time is excluded; it is reported separately as the warm-up's time); the best of ``--repeats`` is kept.

Usage::

    python benchmarks/bench_permtest_statistic.py --output /tmp/bench_permtest_statistic.json \
        [--num_perms 256] [--d_model 256] [--n_layers 4] [--d_ff 768] [--vocab 4096]
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
    parser.add_argument("--num_perms", type=int, default=256, help="draws per timed call")
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--n_layers", type=int, default=4)
    parser.add_argument("--d_ff", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats (best is kept)")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp

    from jaxind.models.config import ModelConfig
    from jaxind.models.model import init_params
    from jaxind.stats import permtest, statistics

    cfg = ModelConfig(
        family="llama",
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=4,
        n_kv_heads=2,
        head_dim=args.d_model // 4,
        d_ff=args.d_ff,
    )
    a, b = (init_params(cfg, jax.random.key(seed)) for seed in (0, 1))

    def cosine(pa, pb):
        va, vb = (jnp.concatenate([x.ravel() for x in jax.tree.leaves(p)]) for p in (pa, pb))
        return va @ vb / (jnp.linalg.norm(va) * jnp.linalg.norm(vb))

    def cosine_draw(consts, perm, cfg):
        _, minus_dist = permtest.l2_draw(consts, perm)
        inner = 0.5 * (consts.sq_a_total + consts.sq_b_total - minus_dist**2)
        return inner / jnp.sqrt(consts.sq_a_total * consts.sq_b_total)

    fast = statistics.PermStatistic(
        name="cosine_fast", prepare=lambda pa, pb, cfg, tokens: permtest.l2_consts(pa, pb, cfg), draw=cosine_draw
    )
    rows = {}
    for name, statistic in (("l2", "l2"), ("cosine", cosine), ("cosine_fast", fast)):
        key = jax.random.key(2)
        start = time.perf_counter()
        warm = permtest.permtest(a, b, cfg, key, num_perms=args.num_perms, statistic=statistic)
        first = time.perf_counter() - start
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = permtest.permtest(a, b, cfg, key, num_perms=args.num_perms, statistic=statistic)
            best = min(best, time.perf_counter() - start)
        assert result.pvalue == warm.pvalue
        rows[name] = {
            "seconds": best,
            "draws_per_s": args.num_perms / best,
            "first_call_s": first,
            "pvalue": result.pvalue,
            "stat0": result.stat0,
        }
        print(f"{name:12s} {args.num_perms / best:10.1f} draws/s  (first call {first:.1f} s, p = {result.pvalue})")
    for name in ("cosine", "cosine_fast"):
        rows[name]["vs_l2"] = rows[name]["draws_per_s"] / rows["l2"]["draws_per_s"]
        print(f"{name} / l2 draws/s: {rows[name]['vs_l2']:.3f}")
    out = {
        "benchmark": "permtest_statistic",
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "model": {"family": cfg.family, "num_params": cfg.num_params(), **vars(args)},
        "results": rows,
    }
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
