#!/usr/bin/env bash
# Runs one training job as NUM_PROCESSES JAX processes on this machine, on the CPU: the
# multi-host code path (coordinator, per-process parts of each batch, collective checkpoints)
# without a cluster.
#
#   CONFIG=configs/synthetic.py NUM_PROCESSES=2 launch/local_multiprocess.sh [extra args]
#
# Settings (environment variables, default in brackets):
#   CONFIG               run config file, given to --config     [configs/synthetic.py]
#   WORKDIR              run directory, given to --workdir      [workdir/multiprocess]
#   NUM_PROCESSES        processes to start                     [2]
#   DEVICES_PER_PROCESS  CPU devices each process gets          [4]
#   PORT                 coordinator port on localhost          [12355]
#   PYTHON               interpreter with cmdcl_jax installed   [python]
#   DRY_RUN              1: print the commands, run nothing     [0]
# Extra arguments go to every process (e.g. --config.train.num_epochs=1).
#
# Process i runs with JAX_PLATFORMS=cpu and XLA_FLAGS ending in
# --xla_force_host_platform_device_count=DEVICES_PER_PROCESS (XLA_FLAGS already set are
# kept), and logs to WORKDIR/logs/process_i.log. If one process fails, the others are
# stopped and the script exits with its status, naming it and its log.
set -euo pipefail

CONFIG=${CONFIG:-configs/synthetic.py}
WORKDIR=${WORKDIR:-workdir/multiprocess}
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-12355}
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

for name in NUM_PROCESSES DEVICES_PER_PROCESS PORT; do
  if ! [[ ${!name} =~ ^[1-9][0-9]*$ ]]; then
    echo "$0: $name=${!name} is not a positive integer" >&2
    exit 2
  fi
done

log_dir="$WORKDIR/logs"
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

if [[ $DRY_RUN == 1 ]]; then
  printf 'mkdir -p %q\n' "$log_dir"
else
  mkdir -p "$log_dir"
fi

pids=()
stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT
trap 'stop_all; exit 143' TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  command=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags"
    "$PYTHON" -m cmdcl_jax.main --config "$CONFIG" --workdir "$WORKDIR"
    "--coordinator_address=localhost:$PORT" "--num_processes=$NUM_PROCESSES" "--process_id=$i"
    "$@")
  log="$log_dir/process_$i.log"
  if [[ $DRY_RUN == 1 ]]; then
    printf '%q ' "${command[@]}"
    printf '>%q 2>&1 &\n' "$log"
  else
    "${command[@]}" >"$log" 2>&1 &
    pids+=("$!")
  fi
done
if [[ $DRY_RUN == 1 ]]; then
  exit 0
fi
echo "started $NUM_PROCESSES processes (PIDs ${pids[*]}); logs in $log_dir/" >&2

# Poll rather than `wait -n`: the first process to fail must be known by its index.
finished=()
remaining=$NUM_PROCESSES
while ((remaining)); do
  sleep 1
  for i in "${!pids[@]}"; do
    if [[ -n ${finished[i]:-} ]] || kill -0 "${pids[i]}" 2>/dev/null; then
      continue
    fi
    finished[i]=1
    remaining=$((remaining - 1))
    status=0
    wait "${pids[i]}" || status=$?
    if ((status != 0)); then
      stop_all
      echo "$0: process $i failed (exit status $status); its log, $log_dir/process_$i.log, ends:" >&2
      tail -n 20 "$log_dir/process_$i.log" >&2
      exit "$status"
    fi
  done
done
echo "all $NUM_PROCESSES processes finished; logs in $log_dir/" >&2
