#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker; JAX finds the other hosts itself
# (bigmodel.distributed calls jax.distributed.initialize() when TPU_WORKER_HOSTNAMES is set,
# which the TPU VM image provides). Documented, not run in CI.
#
#   TPU=my-v4-32 ZONE=us-central2-b WORKDIR=gs://my-bucket/runs/gpt2 \
#     launch/tpu_pod.sh experiments/gpt_shakespeare_char.gin --gin.MeshConfig.fsdp=-1 --gin.MeshConfig.data=1
#
# Before the first run, install the project on every worker:
#   gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
#     "git clone <this repository> bigmodel && cd bigmodel && python3 -m venv .venv && \
#      .venv/bin/pip install -e . 'jax[tpu]'"
# Orbax writes checkpoints straight to gs:// paths; the workdir must be shared by all hosts.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (a gs:// path)}"
[[ $# -ge 1 ]] || { echo "usage: $0 RECIPE.gin [--gin.NAME=VALUE ...]" >&2; exit 2; }
recipe="$1"; shift
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd bigmodel && .venv/bin/python -m bigmodel train --gin_file=$recipe --workdir=$WORKDIR $args"
