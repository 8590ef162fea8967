"""torchrun worker: the bench's vendored NeMo-RL top-k path against our renormalised objectives.

At TP = world size, in fp32 (their compute dtype), NeMo-RL's teacher top-k (distributed_vocab_topk) and its
renormalised forward / reverse / mixed KL (zero_outside_topk=False) against `topk_fkl_norm`,
`topk_rkl_norm`, `topk_mixed_norm` with support=teacher, values and this rank's gradient. Rank 0
prints one JSON line: {kl_type: largest relative error over ranks}.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from opd_megatron.losses import vocab_parallel_distill_loss  # noqa: E402
from tests.losses.compare import rel_err, shard  # noqa: E402
from tests.losses.reference import make_case  # noqa: E402
from tools.peers import nemo_rl_topk  # noqa: E402

OURS = {"forward": "topk_fkl_norm", "reverse": "topk_rkl_norm", "mixed": "topk_mixed_norm"}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world, group = dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    case = make_case(3, batch=2, seq=6, padded_vocab=48, vocab_size=48, top_k=5)
    student = shard(case["student"], rank, world)
    teacher = shard(case["teacher"], rank, world)
    width = student.shape[-1]
    errors = {}
    for kl_type, loss in OURS.items():
        theirs = student.clone().requires_grad_()
        # Their path computes in float32 (it casts both sides): ours gets the same fp32 logits.
        values, ids = nemo_rl_topk.distributed_vocab_topk(
            teacher, 5, group, vocab_start_index=rank * width,
            vocab_end_index=(rank + 1) * width)
        student_lp, teacher_lp = nemo_rl_topk.get_distillation_topk_logprobs_from_logits(
            theirs, values, ids, vocab_parallel_rank=rank, vocab_parallel_group=group)
        their_kl = nemo_rl_topk.distillation_per_token_kl(student_lp, teacher_lp, kl_type, 0.3)
        their_kl.sum().backward()
        ours = student.float().clone().requires_grad_()
        our_kl, _ = vocab_parallel_distill_loss(ours, teacher.float(), loss=loss, top_k=5,
                                                support="teacher", beta=0.3, tp_group=group,
                                                with_metrics=False)
        # NeMo-RL drops the last position (next-token alignment) before the loss.
        our_kl[:, :-1].sum().backward()
        errors[kl_type] = max(rel_err(our_kl[:, :-1], their_kl), rel_err(ours.grad, theirs.grad))
    report = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(report, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps(dict(zip(errors, report.tolist()))))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
