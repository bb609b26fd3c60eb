#!/usr/bin/env bash
# Runs one bigmodel command as N cooperating JAX processes on this host (CPU collectives
# through gloo), each with its own fake CPU devices: the same code path as a multi-host run.
#
#   launch/local_multiprocess.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] -- train --gin_file=... --workdir=DIR
#
# Process i logs to $LOG_DIR/proc_i.log and writes its pid to $LOG_DIR/proc_i.pid (default: the
# current directory). PYTHON picks the interpreter (default: .venv/bin/python, else python3).
# A SIGTERM or SIGUSR1 to any of the processes makes all of them save a checkpoint at the same
# step and exit 75; the script then exits 75 too (preempted: run it again to resume).
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
  echo $! >"$LOG_DIR/proc_${i}.pid"
done
status=0
preempted=0
for i in "${!pids[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if [[ $rc -eq 75 ]]; then
    preempted=$((preempted + 1))
  elif [[ $rc -ne 0 ]]; then
    echo "process $i failed (exit $rc); its log:" >&2
    tail -n 30 "$LOG_DIR/proc_${i}.log" >&2
    status=1
  fi
done
if [[ $status -eq 0 && $preempted -eq ${#pids[@]} ]]; then
  tail -n 1 "$LOG_DIR/proc_0.log"
  exit 75
elif [[ $status -eq 0 && $preempted -gt 0 ]]; then
  echo "only $preempted of ${#pids[@]} processes stopped for preemption" >&2
  status=1
fi
[[ $status -eq 0 ]] && tail -n 3 "$LOG_DIR/proc_0.log"
exit $status
