"""Worker for test_nonfinite.py: an inf in one rank's gradient, with a finite loss, in bf16.

Three optimizer steps: clean, poisoned (only the last rank's output gradient gets an inf), clean.
Each rank reports what the engine said and whether its weights moved.
"""
import json
import sys

import torch

from opd_megatron.config.schema import OptimizerConfig, ParallelConfig, PrecisionConfig
from opd_megatron.models.arch import ModelArch
from opd_megatron.runtime import distributed as rd
from opd_megatron.trainer.engine import build_trainable

ARCH = ModelArch(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96,
                 num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


class InfGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite); an inf in the gradient it passes back."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad.view(-1)[0] = float("inf")
        return grad


def cross_entropy(poison: bool):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def loss_fn(output, mb):
        if poison:
            output = InfGradient.apply(output)
        losses = vocab_parallel_cross_entropy(output.float(), mb["labels"])
        return losses.sum(), torch.tensor(losses.numel()), {"loss_sum": losses.sum().detach()}
    return loss_fn


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for chunk in model.chunks for p in chunk.parameters()]


def moved(before, after) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def main():
    tp = int(sys.argv[1])   # the rest of the world is data-parallel
    parallel = ParallelConfig(tensor_parallel=tp)
    rd.initialize(parallel, seed=1234)
    from megatron.core import parallel_state as ps

    model = build_trainable(ARCH, parallel, PrecisionConfig(precision="bf16"),
                            OptimizerConfig(lr=1e-3), total_steps=10)
    gen = torch.Generator().manual_seed(ps.get_data_parallel_rank())
    tokens = torch.randint(0, ARCH.vocab_size, (2, 9), generator=gen)
    mbs = [{"input_ids": tokens[i:i + 1, :-1], "labels": tokens[i:i + 1, 1:]} for i in range(2)]
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    report = {"rank": rank, "steps": []}
    for poisoned in (False, True, False):
        before = weights(model)
        metrics, info = model.train_step(mbs, cross_entropy(poisoned and rank == world - 1))
        finite_loss = all(torch.isfinite(m["loss_sum"]).item() for m in metrics)
        report["steps"].append({**info, "moved": moved(before, weights(model)),
                                "finite_loss": finite_loss,
                                "finite_weights": all(torch.isfinite(w).all().item()
                                                      for w in weights(model)),
                                "lr_schedule_step": model.scheduler.num_steps})
    reports = [None] * world
    torch.distributed.all_gather_object(reports, report)
    rd.shutdown()
    if rank == 0:
        print(json.dumps(reports), flush=True)


if __name__ == "__main__":
    main()
