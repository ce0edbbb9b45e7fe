"""Compile time of the MATCH pass with the layers scanned (``lax.scan``) vs unrolled (a Python loop,
the program before the layers were stacked), for 4, 16 and 64 layers, in one run.

The pass is :func:`jaxind.stats.grams.accumulate_step` for a pair of equal random Llama models, every layer
paired with itself (MATCH's default). For each depth and each way, the step is traced and lowered
(``lower``) and compiled by XLA (``compile``) from a cold cache; one step then runs once and its state is
compared between the two ways (the same numbers up to float rounding). The ratio is unrolled / scanned.

    python benchmarks/bench_scan.py --output benchmarks/results/scan_compile_cpu.json [--layers 4,16,64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxind.models import model  # noqa: E402
from jaxind.models.config import ModelConfig  # noqa: E402
from jaxind.stats import grams  # noqa: E402

BASE = ModelConfig(
    family="llama", vocab_size=1024, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=512
)


def measure(cfg: ModelConfig, unroll: bool, tokens: jax.Array) -> dict:
    """Lower + compile + one run of the MATCH pass step for ``cfg`` (all layers collected)."""
    jax.clear_caches()
    params_a = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(0))
    params_b = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(1))
    layers = tuple(range(cfg.n_layers))
    static = dict(cfg_a=cfg, cfg_b=cfg, layers_a=layers, layers_b=layers, pair_index=tuple((l, l) for l in layers))
    n = cfg.n_layers
    state = grams.init_state(cfg.d_model, cfg.d_model, cfg.d_ff, cfg.d_ff, n, n, (n,))
    t0 = time.perf_counter()
    lowered = grams.accumulate_step.lower(state, params_a, params_b, tokens, None, unroll=unroll, **static)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    out = jax.block_until_ready(compiled(state, params_a, params_b, tokens, None))
    t3 = time.perf_counter()
    return {
        "seconds_lower": t1 - t0,
        "seconds_compile": t2 - t1,
        "seconds_lower_and_compile": t2 - t0,
        "seconds_first_step": t3 - t2,
        "hlo_chars": len(lowered.as_text()),
        "state": {k: np.asarray(v) for k, v in out.items()},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON path for the results")
    parser.add_argument("--layers", default="4,16,64", help="comma-separated depths")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=64)
    args = parser.parse_args(argv)
    tokens = jax.random.randint(jax.random.key(2), (args.batch_size, args.seq_len), 0, BASE.vocab_size)
    rows = []
    for depth in (int(x) for x in args.layers.split(",")):
        cfg = BASE.replace(n_layers=depth)
        scanned = measure(cfg, False, tokens)
        unrolled = measure(cfg, True, tokens)
        diff = max(
            float(
                np.max(np.abs(scanned["state"][k] - unrolled["state"][k]))
                / max(np.max(np.abs(unrolled["state"][k])), 1e-30)
            )
            for k in scanned["state"]
        )
        row = {
            "n_layers": depth,
            "scanned": {k: v for k, v in scanned.items() if k != "state"},
            "unrolled": {k: v for k, v in unrolled.items() if k != "state"},
            "ratio_lower_and_compile": unrolled["seconds_lower_and_compile"] / scanned["seconds_lower_and_compile"],
            "max_relative_difference": diff,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "benchmark": "match_pass_compile_scanned_vs_unrolled",
        "model": {k: getattr(BASE, k) for k in ("d_model", "d_ff", "n_heads", "n_kv_heads", "head_dim", "vocab_size")},
        "tokens": [args.batch_size, args.seq_len],
        "rows": rows,
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.output)
    return result


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
