"""Sequence packing for SFT: several (input_ids, loss_mask) samples per fixed-length row."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class PackedBatch:
    tokens: torch.Tensor        # [R, L] int64
    loss_mask: torch.Tensor     # [R, L] int64, 1 where the token is a training target
    position_ids: torch.Tensor  # [R, L] int64, restarting at 0 in every segment
    segment_ids: torch.Tensor   # [R, L] int64, 1.. per sample in its row, 0 on padding


def pack_sequences(samples: Sequence[tuple[Sequence[int], Sequence[int]]], seq_len: int,
                   pad_id: int) -> PackedBatch:
    """First-fit packing in sample order (deterministic, so resume replays the same rows).

    A segment's first token is never a target: it has no predecessor inside its segment, and
    predicting it from the previous segment's last token would leak across samples.
    """
    rows: list[list[int]] = []
    fill: list[int] = []
    for i, (ids, mask) in enumerate(samples):
        if not 0 < len(ids) <= seq_len or len(mask) != len(ids):
            raise ValueError(f"pack_sequences: sample {i} has {len(ids)} tokens and {len(mask)} mask "
                             f"entries; need equal counts in 1..seq_len={seq_len}")
        row = next((r for r, used in enumerate(fill) if used + len(ids) <= seq_len), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(i)
        fill[row] += len(ids)

    shape = (len(rows), seq_len)
    tokens = torch.full(shape, pad_id, dtype=torch.long)
    loss_mask, position_ids, segment_ids = (torch.zeros(shape, dtype=torch.long) for _ in range(3))
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, start=1):
            ids, mask = samples[i]
            end = start + len(ids)
            tokens[r, start:end] = torch.as_tensor(list(ids), dtype=torch.long)
            loss_mask[r, start:end] = torch.as_tensor(list(mask), dtype=torch.long)
            loss_mask[r, start] = 0
            position_ids[r, start:end] = torch.arange(len(ids))
            segment_ids[r, start:end] = segment
            start = end
    return PackedBatch(tokens=tokens, loss_mask=loss_mask, position_ids=position_ids,
                       segment_ids=segment_ids)


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[R, L, L] bool, True where query i may attend to key j: same segment, j <= i, no padding."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(segment_ids.shape[1], segment_ids.shape[1], dtype=torch.bool).tril()
    return same & causal & (segment_ids != 0)[:, :, None]
