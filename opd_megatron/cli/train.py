"""`train`: run a stage (sft, rlvr, opd, opsd) from a recipe, under torchrun for several ranks.

    torchrun --nproc-per-node 2 -m opd_megatron train --config conf/sft_tiny_tp1.yaml parallel.tensor_parallel=2
"""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    from opd_megatron.cli.common import add_recipe_arguments

    add_recipe_arguments(sub.add_parser("train", help="run a training stage from a recipe"))


def run(args) -> int:
    import os

    from opd_megatron.cli.common import load_and_validate
    from opd_megatron.stages.config import StageConfig
    from opd_megatron.stages.runner import run_stage

    cfg, arch = load_and_validate(args.config, args.overrides, StageConfig)
    result = run_stage(cfg, arch, args.config)
    # The process group is gone by now: rank 0 is read from torchrun's environment.
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final_eval": result.get("final_eval", {}),
                          "last": result["history"][-1] if result["history"] else {}}), flush=True)
    return 0
