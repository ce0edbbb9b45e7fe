"""Sweep cost for N = 3, 5, 8 models: ``python -m jaxind.sweep`` (each model converted and fingerprinted
once, pairs from the fingerprints) against the same pairs run one by one through ``python -m jaxind.main``
(two model loads and a forward pass of both models per pair), side by side in one run.

Models: Llama-architecture random models (4 layers, d=256, h=704, vocab 2,048) written as jaxind
checkpoints: two families (a base, fine-tune proxies) and independent models. Tests: csu, match on
32 x 64 random tokens. Both ways share one warm JAX compilation cache (a warm-up run of each fills it
first), and the sweep gets a fresh jaxind cache per N (nothing converted or fingerprinted beforehand).
The p-values of every pair must agree between the two ways.

    python benchmarks/bench_sweep.py --output benchmarks/results/sweep_cpu.json [--sizes 3,5,8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from helpers import numpy_noise, numpy_params, save_jaxind  # noqa: E402

from jaxind.models.config import ModelConfig  # noqa: E402

CFG = ModelConfig(
    family="llama", vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=704
)
DATA = ["--num_sequences=32", "--seq_len=64"]


def build_models(folder: str, n: int) -> dict[str, str]:
    """``n`` models: bases 1 and 2 with fine-tune proxies, then independent ones."""
    specs = [("base1", None), ("ft1", "base1"), ("base2", None), ("ft1b", "base1"), ("ft2", "base2")]
    specs += [(f"ind{i}", None) for i in range(1, 9)]
    params: dict[str, object] = {}
    out = {}
    for i, (name, parent) in enumerate(specs[:n]):
        params[name] = numpy_params(CFG, seed=i) if parent is None else numpy_noise(params[parent], 100 + i, 0.1)
        out[name] = save_jaxind(os.path.join(folder, name), CFG, params[name], name)
    return out


def run(module: str, argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{module} {argv} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def sweep_config(path: str, models: dict[str, str]) -> str:
    import yaml

    body = {
        "models": [{"name": n, "source": p} for n, p in models.items()],
        "tests": ["csu", "match"],
        "data": {"kind": "random", "num_sequences": 32, "seq_len": 64, "seed": 0},
    }
    with open(path, "w") as f:
        yaml.safe_dump(body, f)
    return path


def one_size(folder: str, models: dict[str, str], env: dict[str, str]) -> dict:
    n = len(models)
    config = sweep_config(os.path.join(folder, f"sweep{n}.yaml"), models)
    sweep_env = {**env, "JAXIND_CACHE": os.path.join(folder, f"cache{n}")}
    out = os.path.join(folder, f"out{n}")
    sweep_s = run("jaxind.sweep", [f"--config={config}", f"--output={out}"], sweep_env)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    names = list(models)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    main_s, worst = 0.0, 0.0
    for a, b in pairs:
        result = os.path.join(folder, f"main{n}_{a}__{b}.json")
        argv = [f"--model_a={models[a]}", f"--model_b={models[b]}", "--tests=csu,match", *DATA, f"--output={result}"]
        main_s += run("jaxind.main", argv, env)
        with open(result) as f:
            mine = json.load(f)["tests"]
        with open(os.path.join(out, "pairs", f"{a}__{b}.json")) as f:
            swept = json.load(f)["tests"]
        for test in ("csu", "match"):
            worst = max(worst, abs(mine[test]["log10_pvalue"] - swept[test]["log10_pvalue"]))
    counters = summary["counters"]
    return {
        "models": n,
        "pairs": len(pairs),
        "sweep_s": sweep_s,
        "one_by_one_s": main_s,
        "one_by_one_over_sweep": main_s / sweep_s,
        "sweep_model_loads": sum(counters["converted"].values()),
        "sweep_forward_passes": sum(counters["fingerprinted"].values()),
        "one_by_one_model_loads": 2 * len(pairs),
        "one_by_one_forward_passes": 2 * len(pairs),
        "max_abs_log10_pvalue_difference": worst,
        "dependent_pairs": summary["dependent_pairs"],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--sizes", default="3,5,8")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
        env["JAXIND_COMPILATION_CACHE"] = os.path.join(folder, "jax")
        models = build_models(os.path.join(folder, "models"), max(int(s) for s in args.sizes.split(",")))
        warm = dict(list(models.items())[:2])  # fills the compilation cache for both ways
        os.makedirs(os.path.join(folder, "warm"))
        one_size(os.path.join(folder, "warm"), warm, env)
        for n in (int(s) for s in args.sizes.split(",")):
            row = one_size(folder, dict(list(models.items())[:n]), env)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "benchmark": "sweep vs pairs one by one through jaxind.main (csu, match; 4-layer d=256 models)",
        "machine": platform.platform(),
        "rows": rows,
    }
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
