# Copyright (c) 2025, NVIDIA CORPORATION.  All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""NeMo-RL's distributed teacher-top-k distillation path, vendored for tools/bench_loss.py only.

Source: https://github.com/NVIDIA-NeMo/RL at commit 7ea279abfbeb698b092856d0dab61e7cf39bc909
  nemo_rl/distributed/model_utils.py: distributed_vocab_topk, gather_logits_at_global_indices,
      get_distillation_topk_logprobs_from_logits
  nemo_rl/algorithms/loss/loss_functions.py: DistillationLossFn.__call__ (the KL part)
Copied as they are there, except: the context-parallel branches (cp_group / cp_size > 1) and the
DTensor and `zero_outside_topk=True` branches are removed (the benchmark runs tensor parallelism
only, renormalised on the teacher's top-k), and the loss keeps only its per-token KL. Not part of
the opd_megatron package.
"""
from typing import Optional

import torch

COMMIT = "7ea279abfbeb698b092856d0dab61e7cf39bc909"


@torch.no_grad()
def distributed_vocab_topk(
    vocab_parallel_logits: torch.Tensor,
    k: int,
    tp_group: torch.distributed.ProcessGroup,
    *,
    vocab_start_index: int,
    vocab_end_index: int,
    chunk_size: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert vocab_end_index > vocab_start_index
    world_size = torch.distributed.get_world_size(tp_group)

    B, S, V_local = vocab_parallel_logits.shape
    V_total = V_local * world_size
    K_eff = int(min(k, max(1, V_total)))

    if chunk_size is None:
        chunk_size = S

    vals_chunks: list[torch.Tensor] = []
    idx_chunks: list[torch.Tensor] = []

    for s0 in range(0, S, chunk_size):
        s1 = min(S, s0 + chunk_size)
        # Upcast only the current slice to bound the fp32 working set to
        # [B, chunk_size, V_local] (chunk_size driven by logprob_chunk_size).
        logits_chunk = vocab_parallel_logits[:, s0:s1, :].to(dtype=torch.float32)
        # local top-k on this TP rank
        local_vals, local_idx_local = torch.topk(logits_chunk, min(k, V_local), dim=-1)
        local_idx_global = local_idx_local + int(vocab_start_index)

        # gather candidates from all TP ranks
        gathered_vals = [torch.empty_like(local_vals) for _ in range(world_size)]
        gathered_idx = [torch.empty_like(local_idx_global) for _ in range(world_size)]
        torch.distributed.all_gather(gathered_vals, local_vals, group=tp_group)
        torch.distributed.all_gather(gathered_idx, local_idx_global, group=tp_group)

        all_vals = torch.cat(gathered_vals, dim=-1)
        all_idx = torch.cat(gathered_idx, dim=-1)

        sel_vals, sel_pos = torch.topk(all_vals, K_eff, dim=-1)
        sel_idx = torch.gather(all_idx, dim=-1, index=sel_pos)

        vals_chunks.append(sel_vals)
        idx_chunks.append(sel_idx)

    topk_vals = (
        torch.cat(vals_chunks, dim=1) if len(vals_chunks) > 1 else vals_chunks[0]
    )
    topk_global_indices = (
        torch.cat(idx_chunks, dim=1) if len(idx_chunks) > 1 else idx_chunks[0]
    )

    return topk_vals, topk_global_indices


def gather_logits_at_global_indices(
    vocab_parallel_logits: torch.Tensor,
    global_indices: torch.Tensor,
    tp_group: Optional[torch.distributed.ProcessGroup] = None,
    *,
    vocab_start_index: int,
    vocab_end_index: int,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    B, S, V_local = vocab_parallel_logits.shape
    if chunk_size is None:
        chunk_size = S

    out_chunks: list[torch.Tensor] = []
    for s0 in range(0, S, chunk_size):
        s1 = min(S, s0 + chunk_size)
        # Upcast only the current slice to bound the fp32 working set to
        # [B, chunk_size, V_local] (chunk_size driven by logprob_chunk_size).
        logits_chunk = vocab_parallel_logits[:, s0:s1, :].to(dtype=torch.float32)
        gi = global_indices[:, s0:s1, :]

        in_range = (gi >= int(vocab_start_index)) & (gi < int(vocab_end_index))
        # Map global ids to local shard ids and clamp to valid range to avoid OOB gather
        li = (gi - int(vocab_start_index)).clamp(min=0, max=V_local - 1)

        local_vals = torch.gather(logits_chunk, dim=-1, index=li)
        local_vals = local_vals * in_range.to(dtype=local_vals.dtype)

        if tp_group is not None:
            torch.distributed.all_reduce(
                local_vals, op=torch.distributed.ReduceOp.SUM, group=tp_group
            )
        out_chunks.append(local_vals)

    gathered_logits = (
        torch.cat(out_chunks, dim=1) if len(out_chunks) > 1 else out_chunks[0]
    )

    return gathered_logits


def get_distillation_topk_logprobs_from_logits(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    vocab_parallel_rank: int,
    vocab_parallel_group: torch.distributed.ProcessGroup,
):
    """zero_outside_topk=False, calculate_entropy=False, vocab-parallel student logits."""
    # Ensure float32 for stability
    student_logits = student_logits.to(torch.float32)
    # Move teacher topk indices to the same device as student logits
    teacher_topk_indices = teacher_topk_indices.to(student_logits.device)

    parallel_group = vocab_parallel_group
    V_local = int(student_logits.shape[-1])
    vocab_start_index = vocab_parallel_rank * V_local
    vocab_end_index = (vocab_parallel_rank + 1) * V_local

    student_topk_logits = gather_logits_at_global_indices(
        student_logits,
        teacher_topk_indices,
        tp_group=parallel_group,
        vocab_start_index=vocab_start_index,
        vocab_end_index=vocab_end_index,
    )
    student_topk_logprobs = torch.nn.functional.log_softmax(
        student_topk_logits, dim=-1
    )

    # Move teacher tensors to the same device/dtype as student_topk_logits
    teacher_topk_logits = teacher_topk_logits.to(
        student_topk_logprobs.device, dtype=student_topk_logprobs.dtype
    )
    teacher_topk_logprobs = torch.nn.functional.log_softmax(teacher_topk_logits, dim=-1)

    # Single point of next-token alignment after TP/CP processing
    teacher_topk_logprobs = teacher_topk_logprobs[:, :-1, :]
    student_topk_logprobs = student_topk_logprobs[:, :-1, :]

    return student_topk_logprobs, teacher_topk_logprobs


def distillation_per_token_kl(
    student_topk_logprobs: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    kl_type: str = "reverse",
    mixed_kl_weight: float = 0.5,
) -> torch.Tensor:
    """DistillationLossFn.__call__ with zero_outside_topk=False, before masking: [B, S-1]."""
    student_probs = student_topk_logprobs.exp()  # [B, S-1, k]
    teacher_probs = teacher_topk_logprobs.exp()  # [B, S-1, k]

    if kl_type == "forward":
        per_token_kl = teacher_probs * (
            teacher_topk_logprobs - student_topk_logprobs
        )
    elif kl_type == "reverse":
        per_token_kl = student_probs * (
            student_topk_logprobs - teacher_topk_logprobs
        )
    else:
        # mixed KL
        kl_forward = teacher_probs * (teacher_topk_logprobs - student_topk_logprobs)
        kl_reverse = student_probs * (student_topk_logprobs - teacher_topk_logprobs)
        per_token_kl = (
            mixed_kl_weight * kl_forward
            + (1.0 - mixed_kl_weight) * kl_reverse
        )

    return per_token_kl.sum(dim=-1)
