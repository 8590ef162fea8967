#!/usr/bin/env bash
# Supervised fine-tuning on a fixed dataset (cross-entropy).
#
#   examples/run_sft.sh [--dry-run] conf/<recipe>.yaml [key=value ...]
#
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE on every node (see
# examples/_launch.sh and examples/slurm_opd.sbatch).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=_launch.sh
source "$(dirname "${BASH_SOURCE[0]}")/_launch.sh"
opd_launch sft "$@"
