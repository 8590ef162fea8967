#!/usr/bin/env bash
# The prepared one-GPU check (tools/gpu_check.py): bf16 and FP8 forward, the losses on CUDA vs the
# CPU float64 reference, a short OPD step, a vLLM refit, a CPU-converted checkpoint in TE models,
# FP8 steps on odd lengths, the OPD recipe's evaluation through vLLM, refit after a train step,
# GPU memory around sleep/wake/train and the FP8 export served by vLLM: one numbered markdown
# table on stdout, each row pass/fail/skip (tracebacks on stderr); exits 1 when a row failed.
# Bounded to 10 minutes.
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
exec timeout --kill-after=10 590 "${PYTHON:-python}" tools/gpu_check.py --device cuda "$@"
