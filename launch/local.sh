#!/usr/bin/env bash
# One process on this machine, all its devices (CPU, or every local GPU/TPU chip).
#
#   launch/local.sh experiments/gpt_shakespeare_char.gin out/shakespeare [--gin.NAME=VALUE ...]
#
# Running it again on the same workdir resumes from the latest checkpoint.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 RECIPE.gin WORKDIR [--gin.NAME=VALUE ...]" >&2; exit 2; }
recipe="$1"; workdir="$2"; shift 2
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -z "${BIGMODEL_DATA_DIR:-}" && -d ../shared/data ]]; then
  export BIGMODEL_DATA_DIR="$(cd ../shared/data && pwd)"
fi
exec "$PYTHON" -m bigmodel train --gin_file="$recipe" --workdir="$workdir" "$@"
