#!/usr/bin/env bash
# GPU check for the LAP solvers (needs jax[cuda] installed; ~4-5 min on one H100).
# Times scipy, LAPJV (if `lap` is installed), the jitted auction and (n=1536 only) optax's
# Hungarian at n = 1536, 4096, 11008 on random and near-permutation costs, in one run, and
# writes $OUT/bench_lap_gpu.json (rewritten after every size, so a cut-short run keeps data).
# Then the jitted entry point (assignment.lap: the device auction on GPU) against the host solvers at
# n = 64, 512, 2048 and 8 x 512 batched: $OUT/bench_lap_jit_gpu.json.
# Dry run on CPU: LAP_SIZES=256,512 OUT=/tmp/x bash benchmarks/gpu_lap_check.sh
set -euo pipefail
OUT="${OUT:-/tmp}"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt" || true
python -c "import jax; print(jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 330 python benchmarks/bench_lap.py --sizes="${LAP_SIZES:-1536,4096,11008}" \
  --kinds=random,nearperm \
  --hungarian_max_n=1536 --max_seconds=150 --json="$OUT/bench_lap_gpu.json" \
  2>&1 | tee "$OUT/bench_lap_gpu.txt"
timeout 240 python benchmarks/bench_lap.py --mode=jit --repeats=3 --json="$OUT/bench_lap_jit_gpu.json" \
  2>&1 | tee "$OUT/bench_lap_jit_gpu.txt"
