#!/usr/bin/env bash
# The prepared one-GPU check (tools/gpu_check.py): bf16 and FP8 forward, the losses on CUDA vs the
# CPU float64 reference, a short OPD step and a vLLM refit, as one markdown table on stdout
# (tracebacks of failed rows on stderr). Bounded to 5 minutes.
#
#   tools/gpu_check.sh [--only forward,losses,...]
#   docker run --rm --gpus 1 opd-megatron:0.1.0 tools/gpu_check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "error: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2
    exit 2
fi
# One GPU, even on a multi-GPU node; keep the caller's choice if there is one.
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec timeout --kill-after=10 290 "${PYTHON:-python}" tools/gpu_check.py --device cuda "$@"
