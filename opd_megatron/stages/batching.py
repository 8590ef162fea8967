"""Turn token sequences into equal-shape micro-batches for `run_microbatches`.

Sequences are right-padded (the causal mask then needs no padding term) to the longest sequence
of this rank's step, rounded up to the run's shape contract (opd_megatron.data.shapes), so every
micro-batch of one step has the same [b, s], as the pipeline schedule requires, and one that
Transformer Engine and megatron accept. `labels[t]` is the token after position t; masks are
aligned to labels.
"""
from __future__ import annotations

from typing import Sequence

import torch

from opd_megatron.data.shapes import ShapeContract


def shifted_microbatches(sequences: Sequence[Sequence[int]], label_masks: Sequence[Sequence[int]],
                         micro_batch_size: int, pad_id: int,
                         extra: dict[str, Sequence] | None = None,
                         shapes: ShapeContract = ShapeContract()) -> list[dict]:
    """Micro-batches of `input_ids`/`labels`/`loss_mask` [b, L-1] plus per-sequence `extra` fields.

    `label_masks[i][t]` is 1 where token t of sequence i is trained on (t >= 1).
    """
    if len(sequences) % micro_batch_size:
        raise ValueError(f"{len(sequences)} sequences do not split into micro-batches of "
                         f"{micro_batch_size}")
    # Micro-batches hold tokens[:, :-1]: that shifted length is the one the contract pads.
    length = shapes.sequence_length(max(len(s) for s in sequences) - 1) + 1
    tokens = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.float32)
    for i, (seq, m) in enumerate(zip(sequences, label_masks)):
        tokens[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float32)
    batches = []
    for start in range(0, len(sequences), micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        mb = {"input_ids": tokens[rows, :-1], "labels": tokens[rows, 1:],
              "loss_mask": mask[rows, 1:]}
        for key, values in (extra or {}).items():
            part = values[rows]
            mb[key] = part if isinstance(part, torch.Tensor) else list(part)
        batches.append(mb)
    return batches
