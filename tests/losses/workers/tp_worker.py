"""torchrun worker: every loss at TP = world size (gloo) against the float64 reference.

Every rank builds the same full logits from a fixed seed, keeps its vocabulary shard, and compares
its values and its gradient slice with the reference computed on the full logits. Rank 0 prints
one JSON line: {check name: largest relative error over ranks}, plus the tolerance per dtype.
The padded vocabulary (48 columns, 35 real) leaves the last rank with no real column at TP=4.
"""
from __future__ import annotations

import json

import torch
import torch.distributed as dist

from opd_megatron.losses import LOSSES, SUPPORTS, vocab_parallel_distill_loss
from tests.losses.compare import (
    TOLERANCE,
    distill_errors,
    grpo_errors,
    logprobs_errors,
    rel_err,
    sft_errors,
    shard,
)
from tests.losses.reference import make_case

DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def run_checks(case, rank, world, group) -> dict[str, float]:
    common = dict(rank=rank, world=world, tp_group=group)
    results = {}
    for name, dtype in DTYPES.items():
        for loss in LOSSES:
            for support in SUPPORTS:
                errors = distill_errors(case, dtype, loss, support, **common)
                results[f"{name}/{loss}/{support}"] = max(errors.values())
                # Without metrics the renormalised objectives take the support-only path.
                errors = distill_errors(case, dtype, loss, support, with_metrics=False, **common)
                results[f"{name}/{loss}/{support}/no_metrics"] = max(errors.values())
        results[f"{name}/logprobs"] = max(logprobs_errors(case, dtype, **common).values())
        for per_sequence in (False, True):
            errors = grpo_errors(case, dtype, per_sequence, **common)
            results[f"{name}/grpo/{'sequence' if per_sequence else 'token'}"] = max(errors.values())
        results[f"{name}/sft"] = max(sft_errors(case, dtype, **common).values())
    return results


def megatron_group_is_default(case, rank, world) -> float:
    """tp_group=None must pick megatron's tensor-parallel group once megatron is initialised."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    kw = dict(loss="topk_rkl_sg", top_k=case["top_k"], vocab_size=case["vocab_size"])
    student, teacher = shard(case["student"], rank, world), shard(case["teacher"], rank, world)
    implicit, _ = vocab_parallel_distill_loss(student, teacher, **kw)
    explicit, _ = vocab_parallel_distill_loss(
        student, teacher, tp_group=parallel_state.get_tensor_model_parallel_group(), **kw)
    return rel_err(implicit, explicit)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    case = make_case(0, batch=2, seq=5, padded_vocab=48, vocab_size=35, top_k=8)
    results = run_checks(case, rank, world, dist.group.WORLD)
    results["megatron_default_group"] = megatron_group_is_default(case, rank, world)
    errors = torch.tensor(list(results.values()), dtype=torch.float64)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    if rank == 0:
        report = dict(zip(results, errors.tolist()))
        print(json.dumps({"world": world, "errors": report,
                          "tolerance": {k: TOLERANCE[v] for k, v in DTYPES.items()}}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
