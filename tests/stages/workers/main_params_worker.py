"""Load training checkpoints into a bf16 model on one rank and save its fp32 main parameters.

    main_params_worker.py OUT.pt CKPT [CKPT ...]

The optimizer checkpoint stores the main parameters in megatron's bucket layout, padding
included (uninitialised memory): loading it through the distributed optimizer is what separates
the parameters from the padding.
"""
import sys

import torch

from opd_megatron.checkpoint.megatron_dist import read_arch
from opd_megatron.config.schema import OptimizerConfig, ParallelConfig, PrecisionConfig
from opd_megatron.runtime import distributed as rd
from opd_megatron.trainer.checkpointing import load_checkpoint
from opd_megatron.trainer.engine import build_trainable, sub_optimizers


def main_parameters(model) -> list[torch.Tensor]:
    return [main.detach().clone() for sub in sub_optimizers(model.optimizer)
            for group in sub.shard_fp32_from_float16_groups for main in group]


def main():
    out, checkpoints = sys.argv[1], sys.argv[2:]
    rd.initialize(ParallelConfig(), seed=1234)
    result = {}
    for ckpt in checkpoints:
        model = build_trainable(read_arch(ckpt), ParallelConfig(),
                                PrecisionConfig(precision="bf16"), OptimizerConfig(),
                                total_steps=1)
        load_checkpoint(ckpt, model)
        result[ckpt] = main_parameters(model)
    torch.save(result, out)
    rd.shutdown()


if __name__ == "__main__":
    main()
