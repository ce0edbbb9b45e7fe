#!/usr/bin/env bash
# Test one pair of models on every host of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE FLAGFILE [more jaxind flags...]
#   e.g. launch/tpu_pod.sh my-v5p-128 us-east5-a configs/llama2_70b_tpu_pod.flags --output=/mnt/results/pair.json
#
# Copies FLAGFILE to every worker and runs `python -m jaxind.main --flagfile=...` on all of them at once
# (gcloud ... --worker=all). Every host runs the same flagfile; JAXIND_DISTRIBUTED=1 makes jaxind call
# jax.distributed.initialize(), which finds the coordinator, process count and ids from the TPU metadata.
# Only process 0 writes --output (put it on storage every host can reach, or read it off worker 0).
# Assumes jaxind is installed on every worker (pip install "jax[tpu]" jaxind) and that model paths in the
# flagfile exist on every host (a shared filesystem or a copy per host: each host reads every layer group
# and keeps only its own devices' shards).
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,13p' "$0"
  exit 1
fi
TPU_NAME=$1
ZONE=$2
FLAGFILE=$3
shift 3
REMOTE_FLAGS="jaxind_$(basename "$FLAGFILE")"
gcloud compute tpus tpu-vm scp "$FLAGFILE" "$TPU_NAME:$REMOTE_FLAGS" --zone="$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command "JAXIND_DISTRIBUTED=1 python3 -m jaxind.main --flagfile=\$HOME/$REMOTE_FLAGS $(printf '%q ' "$@")"
