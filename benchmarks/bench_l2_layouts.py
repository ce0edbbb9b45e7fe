"""PERMTEST-L2's per-layer inner product ``<A_l, P_s B_l Q_t>`` in several formulations, in one run.

What a draw computes for each layer: ``sum_{k,i,j} A[k, i, j] B[k, s_i, t_j]`` over the layer's MLP stack
(``k = 3``: gate, up, down^T; ``i`` the residual axis, ``j`` the MLP axis). The formulations differ in which
side is gathered, the memory layout and blocking:

- ``rows_then_cols`` (jaxind's kernel): ``B[:, s]`` (a contiguous row gather), then ``[..., t]`` inside rows;
- ``promise_in_bounds``: the same without index clamping;
- ``layout_dhk``: stacks stored ``(d, h, k)``: rows ``s`` are contiguous ``(h, k)`` slabs, then ``k``-vectors
  gathered inside them;
- ``blocked_8``: ``layout_dhk`` row block by row block (8 blocks, ``lax.map``) so that a block stays in cache;
- ``a_rows_b_cols``: the residual permutation gathered on A's side (rows by ``s^-1``), B's columns by ``t``;
- ``both_rows_transposed``: both gathers as row gathers (A pre-transposed ``(k, h, d)``, rows by ``t^-1``;
  B rows by ``s``), then a transposed product;
- ``flat_index``: one gather on the flattened matrix with index ``s_i h + t_j``;
- ``no_ynn_fusion``: ``rows_then_cols`` compiled without XLA:CPU's YNNPACK reduction fusion.

Random SmolLM2-wide stacks (d = 576, h = 1,536; ``--layers`` of them, 20 by default so that the three layouts and
the copy buffers stay under 3 GB), C draws vmapped, layers scanned, as in the kernel.
Each formulation is timed ``--repeats`` times, interleaved (the machine is shared; read the medians side by
side), with numpy's copy bandwidth on a buffer of the same size measured between them.

    python benchmarks/bench_l2_layouts.py --output benchmarks/results/l2_layouts_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

K, D, H = 3, 576, 1536


def _rows_then_cols(a, b, s, t):
    return jnp.sum(a * jnp.take(jnp.take(b, s, axis=1, mode="clip"), t, axis=2, mode="clip"))


def _promise(a, b, s, t):
    bs = b.at[:, s].get(mode="promise_in_bounds")
    return jnp.sum(a * bs.at[:, :, t].get(mode="promise_in_bounds"))


def _dhk(a, b, s, t):  # (d, h, k)
    return jnp.sum(a * jnp.take(jnp.take(b, s, axis=0, mode="clip"), t, axis=1, mode="clip"))


def _blocked(a, b, s, t, blocks=8):  # (d, h, k), row blocks
    ab, sb = a.reshape(blocks, D // blocks, H, K), s.reshape(blocks, D // blocks)
    return jax.lax.map(lambda x: _dhk(x[0], b, x[1], t), (ab, sb)).sum()


def _inverse(p):
    return jnp.zeros_like(p).at[p].set(jnp.arange(p.shape[0], dtype=p.dtype))


def _a_rows_b_cols(a, b, s, t):
    return jnp.sum(jnp.take(a, _inverse(s), axis=1, mode="clip") * jnp.take(b, t, axis=2, mode="clip"))


def _both_rows(at, b, s, t):  # at (k, h, d)
    ap = jnp.take(at, _inverse(t), axis=1, mode="clip")
    return jnp.sum(ap * jnp.swapaxes(jnp.take(b, s, axis=1, mode="clip"), 1, 2))


def _flat(a, b, s, t):
    idx = (s[:, None] * H + t[None, :]).reshape(-1)
    return jnp.sum(a.reshape(K, -1) * jnp.take(b.reshape(K, D * H), idx, axis=1, mode="clip"))


def _draws(layer_fn, stack_a, stack_b, options=None):
    """``(s (C, d), ts (C, L, h)) -> (C, L)`` inner products; the stacks are arguments of the jitted function
    (closed over, they would be baked into each program as constants: a copy per formulation)."""

    def draws(stack_a, stack_b, s, ts):
        def draw(s_c, ts_c):
            body = lambda c, xs: (c, layer_fn(xs[0], xs[1], s_c, xs[2]))  # noqa: E731
            return jax.lax.scan(body, None, (stack_a, stack_b, ts_c))[1]

        return jax.vmap(draw)(s, ts)

    jitted = jax.jit(draws, compiler_options=options)
    return lambda s, ts: jitted(stack_a, stack_b, s, ts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--draws", type=int, default=8, help="C, draws per call (vmapped)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=20, help="layers in the stacks (SmolLM2 has 30)")
    args = parser.parse_args()

    n_layers = args.layers
    k_a, k_b = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k_a, (n_layers, K, D, H), jnp.float32)
    b = jax.random.normal(k_b, (n_layers, K, D, H), jnp.float32)
    layouts = {
        "kdh": (a, b),
        "dhk": tuple(jax.block_until_ready(jnp.transpose(x, (0, 2, 3, 1))) for x in (a, b)),
        "a_t": (jax.block_until_ready(jnp.swapaxes(a, 2, 3)), b),
    }
    variants = {
        "rows_then_cols": _draws(_rows_then_cols, *layouts["kdh"]),
        "promise_in_bounds": _draws(_promise, *layouts["kdh"]),
        "layout_dhk": _draws(_dhk, *layouts["dhk"]),
        "blocked_8": _draws(_blocked, *layouts["dhk"]),
        "a_rows_b_cols": _draws(_a_rows_b_cols, *layouts["kdh"]),
        "both_rows_transposed": _draws(_both_rows, *layouts["a_t"]),
        "flat_index": _draws(_flat, *layouts["kdh"]),
        "no_ynn_fusion": _draws(_rows_then_cols, *layouts["kdh"], {"xla_cpu_experimental_ynn_fusion_type": ""}),
    }
    key = jax.random.key(0)
    keys = jax.random.split(key, args.draws)
    s = jax.vmap(lambda k: jax.random.permutation(k, D))(keys)
    ts = jax.vmap(lambda k: jax.vmap(lambda j: jax.random.permutation(j, H))(jax.random.split(k, n_layers)))(keys)
    results = {}
    for name, fn in variants.items():
        results[name] = np.asarray(fn(s, ts))  # compile
    reference = results["rows_then_cols"]
    agree = {n: float(np.max(np.abs(r - reference) / np.abs(reference))) for n, r in results.items()}
    nbytes = 2 * n_layers * K * D * H * 4
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    rates = collections.defaultdict(list)
    for _ in range(args.repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        rates["copy_bytes_per_s"].append(nbytes / (time.perf_counter() - start))
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(s, ts))
            rates[name].append(args.draws / (time.perf_counter() - start))
    medians = {n: statistics.median(v) for n, v in rates.items()}
    copy = medians["copy_bytes_per_s"]
    print(f"bytes per draw {nbytes / 1e6:.0f} MB, copy bandwidth {copy / 1e9:.2f} GB/s (median of {args.repeats})")
    for name in variants:
        print(
            f"  {name:22s} {medians[name]:6.2f} perms/s  {nbytes * medians[name] / copy:5.0%} of copy bandwidth  "
            f"(max rel. diff to rows_then_cols {agree[name]:.1e})"
        )
    out = {
        "benchmark": "permtest_l2_layer_formulations",
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "draws_per_call": args.draws,
        "layers": n_layers,
        "bytes_per_draw": nbytes,
        "median_perms_per_s": {n: v for n, v in medians.items() if n != "copy_bytes_per_s"},
        "copy_bytes_per_s": copy,
        "all_rates": rates,
        "max_rel_diff_to_rows_then_cols": agree,
    }
    with open(args.output + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(args.output + ".tmp", args.output)


if __name__ == "__main__":
    main()
