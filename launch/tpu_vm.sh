#!/usr/bin/env bash
# One training job on a Cloud TPU VM slice: the same command on every worker, over
# `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a CONFIG=configs/coin.py:task \
#     WORKDIR=/gcs/bucket/workdir/coin launch/tpu_vm.sh [extra args]
#
# Settings (environment variables, default in brackets):
#   TPU_NAME  the TPU VM (required)
#   ZONE      its zone (required)
#   PROJECT   its Google Cloud project                       [gcloud's default]
#   REPO_DIR  the checkout on every worker, relative to the home directory or absolute
#                                                            [cmdcl_jax]
#   CONFIG    run config file, given to --config             [configs/synthetic.py]
#   WORKDIR   run directory, given to --workdir; on a filesystem every worker shares
#                                                            [workdir/tpu]
#   PYTHON    interpreter with cmdcl_jax (and jax[tpu]) installed on every worker
#                                                            [python3]
#   DRY_RUN   1: print the gcloud command, run nothing       [0]
# Extra arguments go to every process.
#
# Each worker runs `python -m cmdcl_jax.main ... --distributed`: jax.distributed.initialize
# finds the slice's workers, their ids and the coordinator from the TPU metadata. The
# workers' output comes back here, interleaved.
set -euo pipefail

TPU_NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
REPO_DIR=${REPO_DIR:-cmdcl_jax}
CONFIG=${CONFIG:-configs/synthetic.py}
WORKDIR=${WORKDIR:-workdir/tpu}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}

for name in TPU_NAME ZONE; do
  if [[ -z ${!name} ]]; then
    echo "$0: $name is unset: name the TPU VM and its zone (TPU_NAME=... ZONE=...)" >&2
    exit 2
  fi
done

# The worker's shell reads --command: every value is quoted for it.
remote="cd $(printf '%q' "$REPO_DIR") && $(printf '%q ' "$PYTHON" -m cmdcl_jax.main \
  --config "$CONFIG" --workdir "$WORKDIR" --distributed "$@")"
remote=${remote% }

command=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"}
  --worker=all --command "$remote")
if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${command[@]}"
  printf '\n'
else
  exec "${command[@]}"
fi
