"""Slice the logits that predict a rollout's response tokens out of a (shifted) sequence batch.

The student reads `prompt + response`, the teacher `teacher_prompt + response` (the teacher prompt
may carry privileged information and have another length). In a shifted micro-batch, the logits
at index t predict `labels[t]` = token t+1, so response token j of a sequence whose prompt has P
tokens is predicted at index P - 1 + j. Gathering from those indices puts student and teacher on
the same response tokens, position by position.
"""
from __future__ import annotations

import torch


def response_index(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([b, R] gather indices into a shifted batch of length `seq_len`, [b, R] float mask)."""
    width = int(response_lengths.max().item()) if len(response_lengths) else 0
    offsets = torch.arange(width)
    index = (prompt_lengths - 1)[:, None] + offsets[None, :]
    mask = (offsets[None, :] < response_lengths[:, None]).float()
    return index.clamp(max=seq_len - 1), mask


def gather_positions(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [b, s, ...] -> [b, R, ...] at `index` [b, R] along the sequence dimension."""
    index = index.to(tensor.device)
    expanded = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(
        *index.shape, *tensor.shape[2:])
    return torch.gather(tensor, 1, expanded)
