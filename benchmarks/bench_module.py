"""Same-run before/after of the Flax module and the parameter table (issue 16): compile time of the forward pass and
of the MATCH pass step for 4, 16 and 64 scanned layers, and PERMTEST (L2) and MATCH throughput, measured on this
tree and on a base checkout, alternately, each in its own subprocess (the same machine, the same load).

    git worktree add /tmp/base 91ebdc8
    python benchmarks/bench_module.py --base /tmp/base --output benchmarks/results/module_vs_base_cpu.json

Ratios are this tree / base of the best of ``--rounds`` rounds (seconds: < 1 is faster; throughput: > 1 is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(layers: list[int]) -> dict:
    """Measures the tree on ``sys.path`` (imported fresh in this process)."""
    import jax
    import numpy as np

    from jaxind.models import model
    from jaxind.models.config import ModelConfig
    from jaxind.stats import grams, match, permtest

    def cfg_of(n: int) -> ModelConfig:
        return ModelConfig("llama", 1024, 256, n, 4, 2, 64, 512)

    out: dict = {}
    tokens = jax.random.randint(jax.random.key(2), (2, 64), 0, 1024)
    for n in layers:
        cfg = cfg_of(n)
        jax.clear_caches()
        pa = jax.jit(lambda k, cfg=cfg: model.init_params(cfg, k))(jax.random.key(0))
        pb = jax.jit(lambda k, cfg=cfg: model.init_params(cfg, k))(jax.random.key(1))
        t0 = time.perf_counter()
        model.forward_jit.lower(pa, cfg, tokens, collect=(n - 1,)).compile()
        t1 = time.perf_counter()
        ls = tuple(range(n))
        static = dict(cfg_a=cfg, cfg_b=cfg, layers_a=ls, layers_b=ls, pair_index=tuple((l, l) for l in ls))
        state = grams.init_state(cfg.d_model, cfg.d_model, cfg.d_ff, cfg.d_ff, n, n, (n,))
        grams.accumulate_step.lower(state, pa, pb, tokens, None, **static).compile()
        t2 = time.perf_counter()
        out[f"forward_compile_s_L{n}"] = t1 - t0
        out[f"match_step_compile_s_L{n}"] = t2 - t1
    cfg = cfg_of(4)
    pa = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(0))
    pb = jax.jit(lambda k: model.init_params(cfg, k))(jax.random.key(1))
    draws = 64
    permtest.permtest(pa, pb, cfg, jax.random.key(3), num_perms=draws)  # compile
    times = []
    for _ in range(3):  # best of three (the machine is shared)
        t0 = time.perf_counter()
        res = permtest.permtest(pa, pb, cfg, jax.random.key(3), num_perms=draws)
        times.append(time.perf_counter() - t0)
    out["permtest_l2_draws_per_s"] = draws / min(times)
    out["permtest_l2_pvalue"] = float(res.pvalue)
    batches = [np.asarray(jax.random.randint(jax.random.key(i), (4, 64), 0, 1024)) for i in range(4)]
    match.match_test(pa, cfg, pb, cfg, batches, key=jax.random.key(4))  # compile
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        res = match.match_test(pa, cfg, pb, cfg, batches, key=jax.random.key(4))
        times.append(time.perf_counter() - t0)
    out["match_tokens_per_s"] = 4 * 4 * 64 / min(times)
    out["match_log10_pvalue"] = float(res.log10_pvalue)
    return out


def run_tree(root: str, layers: str) -> dict:
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--layers", layers]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="a checkout of the base commit")
    parser.add_argument("--output", help="JSON path for the results")
    parser.add_argument("--layers", default="4,16,64")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker([int(n) for n in args.layers.split(",")])))
        return
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    for _ in range(args.rounds):
        for name, root in (("base", args.base), ("new", HERE)):
            runs[name].append(run_tree(root, args.layers))
            print(name, runs[name][-1], flush=True)
    best = {}
    for name, rs in runs.items():
        best[name] = {
            k: (max if k.endswith("per_s") else min)(r[k] for r in rs) for k in rs[0] if not k.endswith("pvalue")
        }
    ratios = {k: best["new"][k] / best["base"][k] for k in best["new"]}
    same = all(r["permtest_l2_pvalue"] == runs["base"][0]["permtest_l2_pvalue"] for r in runs["new"]) and all(
        r["match_log10_pvalue"] == runs["base"][0]["match_log10_pvalue"] for r in runs["new"]
    )
    doc = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "runs": runs}
    doc.update(best=best, ratio_new_over_base=ratios, same_pvalues=same)
    with open(args.output, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps({"ratio_new_over_base": ratios, "same_pvalues": same}, indent=1))


if __name__ == "__main__":
    main()
