"""Localized testing of a depth up-scaled pair: the layer-pair screen (jaxind.stats.layer_screen) vs the full test.

Model A: a random Llama shaped like SmolLM2-135M (d=576, h=1536, 9 heads / 3 KV heads of 64; vocab cut to
4,096 to keep the embedding small), widths divided by ``--width_div`` (default 4: d=144, h=384), output
kernels (``o``, ``down``) scaled by ``--out_scale`` (default 0.1, see :func:`scale_outputs`), with
``--layers`` layers (default 15; the real depth is 30). Model B: A up-scaled SOLAR-style,
``A[0 : L-k] + A[k : L]`` with ``k = round(L * 8 / 30)`` (30 -> 44 for the real depth, 15 -> 22 by
default), then every weight moved by Gaussian noise of ``--noise`` times its
tensor's std (a stand-in for the healing fine-tune). Both runs are in the same process on the same
batches with the same key, after a warm-up (a screened run, which compiles everything both runs use:
the times are without compilation). Reported: wall time of each, pairs tested, the
layer maps and duplicated layers (must be identical), whether every tested pair's p-value equals
the full run's bit for bit, and how many pairs the full run flags were screened out (must be 0).

    python benchmarks/bench_localized_depth.py --output benchmarks/results/localized_depth_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxind.models import model  # noqa: E402
from jaxind.models.config import ModelConfig  # noqa: E402
from jaxind.stats import localized  # noqa: E402

SMOLLM2_WIDTH = ModelConfig(
    family="llama",
    vocab_size=4096,
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


def upscale(params, n_layers: int, key: jax.Array, noise: float):
    """SOLAR-style depth up-scaling of ``params`` (``n_layers`` layers) plus relative noise; returns
    ``(params_b, n_layers_b, source)`` with ``source[j]`` the layer of A that layer j of B copies."""
    k = round(n_layers * 8 / 30)
    source = list(range(n_layers - k)) + list(range(k, n_layers))
    idx = np.asarray(source)
    layers = jax.tree.map(lambda x: x[idx], params["layers"])
    params_b = dict(params, layers=layers)
    leaves, tree = jax.tree.flatten(params_b)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + noise * x.std() * jax.random.normal(k_, x.shape, x.dtype) for x, k_ in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noisy), len(source), source


def scale_outputs(params, scale: float):
    """``params`` with the attention and MLP output kernels (``o``, ``down``) times ``scale``: each layer then
    writes a small update to the residual stream, as in trained models (at init, std 0.02, a SmolLM2-shaped
    layer's attention output is several times the embedding, so the MLP inputs of a copied layer at another
    depth share nothing with the original's and no test can see the copy)."""
    layers = {k: v * scale if k in ("o", "down") else v for k, v in params["layers"].items()}
    return dict(params, layers=layers)


def run(params_a, cfg_a, params_b, cfg_b, batches, key, screen: bool) -> tuple[float, dict]:
    """One localized test; ``(seconds, result extra + overall log10 p)``."""
    t0 = time.perf_counter()
    res = localized.localized_test(params_a, cfg_a, params_b, cfg_b, batches, key=key, screen=screen)
    seconds = time.perf_counter() - t0
    return seconds, {**res.extra, "log10_pvalue": res.log10_pvalue}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON path for the results")
    parser.add_argument("--layers", type=int, default=15, help="layers of A (SmolLM2 has 30)")
    parser.add_argument("--num_batches", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--width_div", type=int, default=4, help="divide d, h and head_dim by this (1: SmolLM2's)")
    parser.add_argument("--out_scale", type=float, default=0.1, help="scale of A's o and down kernels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    w = args.width_div
    cfg_a = SMOLLM2_WIDTH.replace(n_layers=args.layers, d_model=576 // w, d_ff=1536 // w, head_dim=64 // w)
    k_a, k_noise, k_tok, k_lap = jax.random.split(jax.random.key(args.seed), 4)
    params_a = scale_outputs(jax.jit(lambda k: model.init_params(cfg_a, k))(k_a), args.out_scale)
    params_b, n_b, source = upscale(params_a, args.layers, k_noise, args.noise)
    cfg_b = cfg_a.replace(n_layers=n_b)
    tok_keys = jax.random.split(k_tok, args.num_batches)
    batches = [jax.random.randint(k, (args.batch_size, args.seq_len), 0, cfg_a.vocab_size) for k in tok_keys]

    t_warm, _ = run(params_a, cfg_a, params_b, cfg_b, batches, k_lap, True)  # compiles what both runs use
    t_screen, screened = run(params_a, cfg_a, params_b, cfg_b, batches, k_lap, True)
    t_full, full = run(params_a, cfg_a, params_b, cfg_b, batches, k_lap, False)
    same_p = all(
        s is None or s == f
        for rs, rf in zip(screened["log10_pvalue_matrix"], full["log10_pvalue_matrix"])
        for s, f in zip(rs, rf)
    )
    thr = full["threshold_log10"]
    hidden = sum(
        s is None and f < thr
        for rs, rf in zip(screened["log10_pvalue_matrix"], full["log10_pvalue_matrix"])
        for s, f in zip(rs, rf)
    )
    expected = {str(j): a for j, a in enumerate(source)}
    out = {
        "model": f"random Llama, d={cfg_a.d_model}, h={cfg_a.d_ff}, {args.layers} -> {n_b} layers (SOLAR + noise)",
        "out_scale": args.out_scale,
        "layers_a": args.layers,
        "layers_b": n_b,
        "noise": args.noise,
        "tokens": args.num_batches * args.batch_size * args.seq_len,
        "seconds_warmup": t_warm,
        "seconds_screened": t_screen,
        "seconds_full": t_full,
        "ratio": t_screen / t_full,
        "pairs": screened["screen"]["pairs"],
        "pairs_tested": screened["screen"]["pairs_tested"],
        "same_layer_map": screened["layer_map"] == full["layer_map"],
        "layer_map_is_source": screened["layer_map"] == expected,
        "duplicated_layers": screened["duplicated_layers"],
        "same_duplicated_layers": screened["duplicated_layers"] == full["duplicated_layers"],
        "tested_pvalues_identical": same_p,
        "full_hits_screened_out": hidden,
        "log10_pvalue": {"screened": screened["log10_pvalue"], "full": full["log10_pvalue"]},
        "backend": jax.default_backend(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
