"""A MATCH command-line run on a SmolLM2 pair, run twice with JAX's persistent compilation cache (on by
default in the jaxind CLIs, here in a fresh folder), against the same run with the cache off, in one run.

Each run is ``python -m jaxind.main --model_a=smollm2 --model_b=smollm2 --tests=match`` in its own
process (the real SmolLM2-135M GGUF, 30 layers; 8 x 64 random tokens). JAX's own monitoring events
count the compilations each run made (cache misses) and loaded (cache hits): the second run with the
cache must compile nothing.

    python benchmarks/bench_compile_cache.py --output benchmarks/results/compile_cache_cpu.json
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

# Runs jaxind.main with listeners on JAX's compilation-cache events; prints the counts on exit.
_WRAPPER = """
import atexit, json, sys
import jax.monitoring as monitoring
counts = {"cache_hits": 0, "cache_misses": 0, "compile_requests_use_cache": 0, "compile_s": 0.0}
def on_event(name, **kwargs):
    key = name.rsplit("/", 1)[-1]
    if key in counts:
        counts[key] += 1
def on_duration(name, seconds, **kwargs):
    if name == "/jax/core/compile/backend_compile_duration":
        counts["compile_s"] += seconds
monitoring.register_event_listener(on_event)
monitoring.register_event_duration_secs_listener(on_duration)
atexit.register(lambda: print("COMPILE_COUNTS " + json.dumps(counts), file=sys.stderr, flush=True))
sys.argv = ["jaxind.main", *sys.argv[1:]]
from jaxind.cli.main import entry_point
entry_point()
"""


def run(cache: str, args) -> dict:
    argv = ["--model_a=smollm2", "--model_b=smollm2", "--tests=match"]
    argv += [f"--num_sequences={args.num_sequences}", f"--seq_len={args.seq_len}", f"--compilation_cache={cache}"]
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *argv], capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    line = next(l for l in done.stderr.splitlines() if l.startswith("COMPILE_COUNTS "))
    match_line = next(l for l in done.stdout.splitlines() if l.startswith("match"))
    return {"wall_s": seconds, **json.loads(line.split(" ", 1)[1]), "match_row": " ".join(match_line.split()[:2])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--num_sequences", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=64)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        rows = {
            "cache_off": run("off", args),
            "first_run_cold_cache": run(os.path.join(folder, "jax"), args),
            "second_run_warm_cache": run(os.path.join(folder, "jax"), args),
        }
    for name, row in rows.items():
        print(name, json.dumps(row), flush=True)
    result = {
        "benchmark": "jaxind.main --tests=match on smollm2 vs smollm2 (8 x 64 tokens), three processes",
        "machine": platform.platform(),
        "runs": rows,
        "warm_over_off_wall": rows["second_run_warm_cache"]["wall_s"] / rows["cache_off"]["wall_s"],
        "second_run_compilations": rows["second_run_warm_cache"]["cache_misses"],
    }
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return result


if __name__ == "__main__":
    main()
