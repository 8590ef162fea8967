"""Padding variable-length id lists into one batch tensor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch


@dataclass(frozen=True)
class PaddedBatch:
    tokens: torch.Tensor        # [B, T] int64
    mask: torch.Tensor          # [B, T] bool, True on real tokens
    position_ids: torch.Tensor  # [B, T] int64, 0 at each row's first real token


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: Literal["left", "right"] = "right",
              pad_to_multiple_of: int = 1) -> PaddedBatch:
    """Left padding for prompts that are generated from (all rows end at the same column), right
    padding for training sequences. `pad_to_multiple_of` serves sequence/context parallelism,
    which needs the length divisible by the TP or CP size."""
    if not seqs:
        raise ValueError("pad_batch: empty batch")
    if side not in ("left", "right"):
        raise ValueError(f"pad_batch: side must be 'left' or 'right', got {side!r}")
    longest = max(len(s) for s in seqs)
    width = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        tokens[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = True
    position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return PaddedBatch(tokens=tokens, mask=mask, position_ids=position_ids)
