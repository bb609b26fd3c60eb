#!/usr/bin/env bash
# The benchmark on a GPU machine: tokens/s, step time, MFU (PaLM and causal conventions),
# per-device memory and compile time for three points, written to $OUT/results.json and
# $OUT/results.md (a markdown table, also printed).
#
#   launch/gpu_bench.sh                        # all local GPUs, one mesh: data = every GPU
#   OUT=out/bench/h200 PEAK_FLOPS=989e12 launch/gpu_bench.sh --mesh data=1 --mesh fsdp=8
#
# Points (presets of bigmodel/bench.py):
#   gpt2_124m_1024  GPT-2 124M (12L/12H/768d, vocab 50,304), seq 1024, batch 32, bf16 compute
#                   over f32 params. Goal: >= 500K tokens/s on one H200.
#   decoder_1b      a ~1.0B decoder (20L/16H/2048d, d_ff 8192), seq 2048, batch 8, bf16,
#                   remat 'dots'. Goal: >= 55% MFU.
#   bert_large      BERT-large (24L/16H/1024d, MLM + NSP), seq 128, batch 128, bf16.
# Batches are global: with several GPUs each holds batch / (data x fsdp) rows; scale them with
# --batch (e.g. --batch 256 for 8 GPUs). Any other flag of `bigmodel bench` passes through.
#
# MFU is against PEAK_FLOPS per device when set (a datasheet dense bf16 figure: H100/H200 SXM
# 989e12, A100 312e12), else against a bf16 8192^2 matmul measured in the same run; the
# table's header says which. The Hugging Face baseline is CPU-only and is not run here.
#
# Needs jax with CUDA: .venv/bin/pip install -e . "jax[cuda12]" (versions as pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-out/bench/gpu}"
peak=()
[[ -n "${PEAK_FLOPS:-}" ]] && peak=(--peak_flops "$PEAK_FLOPS")
# XLA GPU flags commonly used for throughput (MaxText sets similar ones); override via XLA_FLAGS.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
"$PYTHON" - <<'EOF'
import jax
devs = jax.devices()
print(f"{len(devs)} x {devs[0].device_kind} ({devs[0].platform}), jax {jax.__version__}")
if devs[0].platform != "gpu":
  raise SystemExit("gpu_bench.sh: no GPU visible to jax (install jax[cuda12])")
EOF
"$PYTHON" -m bigmodel bench --baseline off --no_input_pipeline --warmup 3 --steps 5 --rounds 2 \
  --preset gpt2_124m_1024 --preset decoder_1b --preset bert_large \
  "${peak[@]}" --out "$OUT/results.json" "$@"
