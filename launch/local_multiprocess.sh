#!/usr/bin/env bash
# Runs one bigmodel command as N cooperating JAX processes on this host (CPU collectives
# through gloo), each with its own fake CPU devices: the same code path as a multi-host run.
#
#   launch/local_multiprocess.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] -- train --gin_file=... --workdir=DIR
#
# Process i logs to $LOG_DIR/proc_i.log (default: the current directory). PYTHON picks the
# interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
NUM=2
DEVICES=4
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) NUM="$2"; shift 2 ;;
    -d) DEVICES="$2"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [-n N] [-d DEVICES] -- COMMAND ARGS..." >&2; exit 2; }
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PORT="${PORT:-$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOG_DIR="${LOG_DIR:-.}"
mkdir -p "$LOG_DIR"
pids=()
for ((i = 0; i < NUM; i++)); do
  BIGMODEL_COORDINATOR="127.0.0.1:${PORT}" BIGMODEL_NUM_PROCESSES="$NUM" BIGMODEL_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES}" \
    "$PYTHON" -m bigmodel "$@" >"$LOG_DIR/proc_${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; its log:" >&2
    tail -n 30 "$LOG_DIR/proc_${i}.log" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] && tail -n 3 "$LOG_DIR/proc_0.log"
exit $status
