#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker; JAX finds the other hosts itself
# (bigmodel.distributed calls jax.distributed.initialize() when TPU_WORKER_HOSTNAMES is set,
# which the TPU VM image provides). Documented, not run in CI.
#
#   TPU=my-v5p-128 TOPOLOGY=v5p-128 ZONE=us-east5-a WORKDIR=gs://my-bucket/runs/gpt2 \
#     launch/tpu_pod.sh experiments/gpt_shakespeare_char.gin --gin.MeshConfig.fsdp=-1 --gin.MeshConfig.data=1
#
# The workflow, end to end (README "A pod run, end to end"):
#   1. prepare the corpus once, to object storage (any machine, parallel workers):
#        bigmodel data prepare --gin_file=RECIPE.gin --out gs://my-bucket/corpus --workers 16
#      and train from it with --gin.DataConfig.prepared_dir="'gs://my-bucket/corpus'";
#   2. compile for the slice's topology (step 0 below) before booking it;
#   3. launch with this script; the workdir is a gs:// path that every host shares;
#   4. preemption: a SIGTERM/SIGUSR1 (maintenance event) makes every host save at the same
#      step and exit 75; this script then launches again, which resumes from that checkpoint
#      (a changed batch, seq len, seed or data is refused on resume unless --allow_changed).
#
# Step 0, before booking the slice: compile the run for its topology on any machine (a laptop
# CPU; needs `pip install -e '.[tpu]'`) and read the per-chip HBM, the largest batch that fits
# and the estimated cost:
#   bigmodel compile --gin_file=RECIPE.gin --topology v5p-128 --mesh fsdp=64 \
#     --find_max_batch --train_tokens 1e10 --chip_hour_usd PRICE
# (exit 0: fits; 3: compiled but does not fit on that slice; 2: a usage error). With TOPOLOGY
# set, this script runs that compile here first and stops unless it fits.
#
# Before the first run, install the project on every worker:
#   gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
#     "git clone <this repository> bigmodel && cd bigmodel && python3 -m venv .venv && \
#      .venv/bin/pip install -e '.[tpu]'"
# Orbax writes checkpoints straight to gs:// paths; the workdir must be shared by all hosts.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (a gs:// path)}"
[[ $# -ge 1 ]] || { echo "usage: $0 RECIPE.gin [--gin.NAME=VALUE ...]" >&2; exit 2; }
recipe="$1"; shift
args=$(printf ' %q' "$@")
if [[ -n "${TOPOLOGY:-}" ]]; then
  python -m bigmodel compile --gin_file="$recipe" --topology "$TOPOLOGY" "$@" \
    || { echo "$0: the run does not fit (or does not compile) on $TOPOLOGY; not launching" >&2; exit 3; }
fi
# Exit status 75 (EX_TEMPFAIL): preempted after a checkpoint; launch again to resume.
for attempt in $(seq 1 "${MAX_RESTARTS:-20}"); do
  status=0
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
    "cd bigmodel && .venv/bin/python -m bigmodel train --gin_file=$recipe --workdir=$WORKDIR $args" \
    || status=$?
  [[ $status -eq 75 ]] || exit $status
  echo "$0: preempted (exit 75); resuming from the latest checkpoint in $WORKDIR (attempt $attempt)" >&2
done
exit 75
