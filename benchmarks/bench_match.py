"""MATCH end to end: one pass over the data for all layers and both projections (jaxind.stats.match)
vs the naive baseline that re-runs the data per layer and per projection (match_test_slow).

Model: a SmolLM2-135M-sized random Llama (30 layers, d=576, h=1536, 9 heads / 3 KV heads of 64,
vocab 49152, tied embeddings) from ``init_params``; B is A plus fine-tune-like noise (so both
methods solve the same near-permutation LAPs and must give the same p-values). Both methods
run in the same process on the same batches; the ratio is slow / fast. Times include JIT
compilation (the naive baseline compiles one truncated forward per layer), and are also
split into the data pass(es) and the LAPs (identical work in both).

    python benchmarks/bench_match.py --output /tmp/bench_match.json [--num_batches 2 --batch_size 2 --seq_len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxind.models import model  # noqa: E402
from jaxind.models.config import ModelConfig  # noqa: E402
from jaxind.stats import match  # noqa: E402

SMOLLM2 = ModelConfig(
    family="llama",
    vocab_size=49152,
    d_model=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    d_ff=1536,
    norm_eps=1e-5,
    rope_theta=100000.0,
    tie_embeddings=True,
)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON path for the results")
    parser.add_argument("--num_batches", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=None, help="use only the first N layers (default all 30)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = SMOLLM2 if args.layers is None else SMOLLM2.replace(n_layers=args.layers)
    key = jax.random.key(args.seed)
    k_a, k_noise, k_tok, k_lap = jax.random.split(key, 4)
    t0 = time.perf_counter()
    params_a = jax.jit(lambda k: model.init_params(cfg, k))(k_a)
    leaves, tree = jax.tree.flatten(params_a)
    params_b = jax.tree.unflatten(
        tree, [w + 0.01 * jax.random.normal(k, w.shape) for w, k in zip(leaves, jax.random.split(k_noise, len(leaves)))]
    )
    jax.block_until_ready(params_b)
    t_init = time.perf_counter() - t0
    batches = [
        jax.random.randint(k, (args.batch_size, args.seq_len), 0, cfg.vocab_size)
        for k in jax.random.split(k_tok, args.num_batches)
    ]

    fast = match.match_test(params_a, cfg, params_b, cfg, batches, key=k_lap)
    slow = match.match_test_slow(params_a, cfg, params_b, cfg, batches, key=k_lap)
    same = all(abs(f.statistic - s.statistic) < 1e-9 for f, s in zip(fast.layers, slow.layers))
    fast, slow = fast.to_json(), slow.to_json()

    result = {
        "benchmark": "match_one_pass_vs_per_layer",
        "model": {
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
            "d_ff": cfg.d_ff,
            "vocab_size": cfg.vocab_size,
            "num_params": cfg.num_params(),
        },
        "tokens": args.num_batches * args.batch_size * args.seq_len,
        "batches": [args.num_batches, args.batch_size, args.seq_len],
        "one_pass": {k: fast[k] for k in ("seconds", "seconds_pass", "seconds_lap", "log10_pvalue")},
        "per_layer_baseline": {k: slow[k] for k in ("seconds", "seconds_pass", "seconds_lap", "log10_pvalue")},
        "ratio_end_to_end": slow["seconds"] / fast["seconds"],
        "ratio_data_pass": slow["seconds_pass"] / fast["seconds_pass"],
        "same_statistics": same,
        "model_forwards": {"one_pass": 2 * args.num_batches, "baseline": 2 * 2 * cfg.n_layers * args.num_batches},
        "seconds_init": t_init,
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    tmp = args.output + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.output)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
