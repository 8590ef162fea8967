"""`smoke`: build a tiny model from a recipe and take a few optimizer steps on one fixed batch.

The fastest check that a machine, an install and a parallel layout work end to end
(`torchrun --nproc-per-node 2 -m opd_megatron smoke --config conf/smoke_tiny.yaml parallel.tensor_parallel=2`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from opd_megatron.config.schema import RunConfig


@dataclass
class SmokeSection:
    steps: int = 5
    micro_batch_size: int = 2
    num_microbatches: int = 2
    seq_length: int = 32


@dataclass
class SmokeConfig(RunConfig):
    smoke: SmokeSection = field(default_factory=SmokeSection)


def add_parser(sub) -> None:
    from opd_megatron.cli.common import add_recipe_arguments

    add_recipe_arguments(sub.add_parser("smoke", help="tiny forward/train smoke run"))


def run(args) -> int:
    from opd_megatron.cli.common import load_and_validate

    cfg, arch = load_and_validate(args.config, args.overrides, SmokeConfig)
    import torch

    from opd_megatron.losses import vocab_parallel_cross_entropy_loss
    from opd_megatron.runtime import distributed as rd
    from opd_megatron.trainer.engine import build_trainable

    rd.initialize(cfg.parallel, cfg.seed)
    from megatron.core import parallel_state as ps

    model = build_trainable(arch, cfg.parallel, cfg.precision, cfg.optimizer, cfg.smoke.steps,
                            cfg.model.make_vocab_size_divisible_by)
    s = cfg.smoke
    gen = torch.Generator().manual_seed(cfg.seed + ps.get_data_parallel_rank())
    tokens = torch.randint(0, arch.vocab_size, (s.num_microbatches, s.micro_batch_size,
                                                s.seq_length + 1), generator=gen)
    microbatches = [{"input_ids": t[:, :-1], "labels": t[:, 1:]} for t in tokens]

    def loss_fn(logits, mb):
        count = mb["labels"].numel()
        loss_sum = vocab_parallel_cross_entropy_loss(logits, mb["labels"], num_tokens=1.0,
                                                     vocab_size=arch.vocab_size)
        return loss_sum, torch.tensor(count), {"loss": loss_sum.detach() / count}

    losses, start = [], time.time()
    for step in range(s.steps):
        metrics, info = model.train_step(microbatches, loss_fn)
        if metrics:
            losses.append(float(sum(m["loss"] for m in metrics) / len(metrics)))
            if ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
                print(f"step {step + 1}/{s.steps} loss {losses[-1]:.4f} "
                      f"grad_norm {info['grad_norm']:.3f} lr {info['lr']:.2e}", flush=True)
    if losses and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        print(json.dumps({"first_loss": losses[0], "last_loss": losses[-1],
                          "seconds": round(time.time() - start, 2)}), flush=True)
    rd.shutdown()
    return 0
