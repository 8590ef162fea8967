"""Reducing per-token losses to the scalar that is optimised.

Every stage (SFT, RLVR/GRPO, OPD, OPSD) uses `token_mean`: the sum over all response tokens of the
batch divided by the number of those tokens, as in the paper and in GRPO/DAPO's token-level mean,
so long responses weigh in proportion to their length. `sequence_mean` (each sequence's token mean,
then the mean over sequences: the original GRPO sample-level mean) is kept for comparison.

With several micro-batches or data-parallel ranks, pass `num_tokens`, the token count of the whole
global batch, so that summing the micro-batch losses gives the global token mean.
"""
from __future__ import annotations

import torch


def token_mean(values: torch.Tensor, mask: torch.Tensor | None = None,
               num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """sum(values * mask) / (num_tokens or sum(mask)); 0 (not NaN) when there are no tokens."""
    if mask is None:
        mask = torch.ones_like(values)
    total = (values * mask).sum()
    if num_tokens is None:
        count = mask.sum()
    else:
        count = torch.as_tensor(num_tokens, dtype=total.dtype, device=total.device)
    return total / torch.where(count > 0, count, 1)


def sequence_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over sequences (dim 0) of each sequence's token mean; empty sequences are skipped."""
    if mask is None:
        mask = torch.ones_like(values)
    flat_values, flat_mask = values.flatten(1), mask.flatten(1).to(values.dtype)
    counts = flat_mask.sum(dim=1)
    per_sequence = (flat_values * flat_mask).sum(dim=1) / torch.where(counts > 0, counts, 1)
    return per_sequence.sum() / (counts > 0).sum().clamp_min(1)
