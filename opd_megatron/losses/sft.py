"""Masked cross-entropy for SFT from vocab-parallel logits.

Built on `vocab_parallel_logprobs` rather than megatron's `vocab_parallel_cross_entropy`, which
overwrites its input logits in place.
"""
from __future__ import annotations

import torch

from opd_megatron.losses.aggregate import token_mean
from opd_megatron.losses.logprobs import vocab_parallel_logprobs


def vocab_parallel_cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor,
                                      loss_mask: torch.Tensor | None = None, *,
                                      num_tokens: float | torch.Tensor | None = None,
                                      tp_group=None, vocab_size: int | None = None,
                                      chunk_size: int | None = None) -> torch.Tensor:
    """Token-mean negative log-likelihood of `labels` [batch, seq] over `loss_mask`.

    Labels at masked positions are never read (they may hold -100 or padding).
    """
    if loss_mask is None:
        loss_mask = torch.ones(labels.shape, device=labels.device)
    elif loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must equal labels shape "
                         f"{tuple(labels.shape)}")
    labels = torch.where(loss_mask != 0, labels, 0)
    logp = vocab_parallel_logprobs(logits, labels, tp_group, vocab_size, chunk_size=chunk_size)
    return token_mean(-logp, loss_mask.to(logp.dtype), num_tokens)
