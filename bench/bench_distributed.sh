#!/usr/bin/env bash
# Several GPUs: DDP scaling (Mistral-7B, 1 and 2 GPUs) and FSDP-QLoRA vs DDP memory (Llama-2-13B
# shapes, 2 GPUs), each row through the train stage (stages/train.py -> accelerate launch).
#   bench/bench_distributed.sh [all|ddp|fsdp|fsdp-resume|cpu-check]      # results in $OUT (default bench-results/)
# Needs 2+ GPUs for ddp/fsdp (device kind nvidia-h100-x2); random bases are built once in
# $BENCH_WORK (default /tmp/medqlora-bench-dist, ~45 GB for both models).
set -euo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
if [ "$PART" != "cpu-check" ]; then
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
fi
exec "$PY" bench/bench_distributed.py --part "$PART" --out "${OUT:-bench-results}" "${@:2}"
