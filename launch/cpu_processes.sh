#!/usr/bin/env bash
# Try a multi-host run on one machine: N local JAX processes with D CPU devices each (JAX's CPU
# collectives over gloo), all running the same flagfile, as on a pod.
#
#   launch/cpu_processes.sh N D FLAGFILE [more jaxind flags...]
#   e.g. launch/cpu_processes.sh 2 2 my.flags --output=/tmp/pair.json
#
# Process i gets --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i; only
# process 0 writes --output. Logs go to jaxind-proc-<i>.log in the current directory.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  sed -n '2,9p' "$0"
  exit 1
fi
N=$1
D=$2
FLAGFILE=$3
shift 3
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < N; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$D" JAX_PLATFORMS=cpu \
    python3 -m jaxind.main --flagfile="$FLAGFILE" --coordinator_address="127.0.0.1:$PORT" \
    --num_processes="$N" --process_id="$i" "$@" > "jaxind-proc-$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
tail -n 20 jaxind-proc-0.log
exit $status
