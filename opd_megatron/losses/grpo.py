"""GRPO / DAPO clipped policy-gradient loss from vocab-parallel logits."""
from __future__ import annotations

import torch

from opd_megatron.losses.aggregate import token_mean
from opd_megatron.losses.logprobs import vocab_parallel_logprobs


def grpo_policy_loss(logits: torch.Tensor, ids: torch.Tensor, old_logprobs: torch.Tensor,
                     advantages: torch.Tensor, loss_mask: torch.Tensor, *,
                     clip_low: float = 0.2, clip_high: float = 0.28,
                     ref_logprobs: torch.Tensor | None = None, kl_coef: float = 0.0,
                     tis_weights: torch.Tensor | None = None,
                     temperature: float = 1.0, num_tokens: float | torch.Tensor | None = None,
                     tp_group=None, vocab_size: int | None = None,
                     chunk_size: int | None = None):
    """Token-mean clipped surrogate loss, optionally plus kl_coef * KL(pi || ref) (k3 estimator).

    ids, old_logprobs, loss_mask, ref_logprobs, tis_weights: [batch, seq]; advantages: [batch, seq]
    per token or [batch] per sequence (broadcast over its tokens). The ratio pi / pi_old is
    clipped to [1 - clip_low, 1 + clip_high] (DAPO's decoupled clip); `tis_weights` (constants,
    see importance.py) multiply each token's surrogate. Returns (loss, metrics) with metrics
    detached: token means clip_fraction (tokens whose gradient the clip removed), ratio_mean,
    approx_kl (k3 estimate of KL(pi_old || pi)), entropy, ref_kl when ref_logprobs is given, and
    ratio_max, the largest ratio on a loss token.
    """
    for name, tensor in (("old_logprobs", old_logprobs), ("loss_mask", loss_mask),
                         ("ref_logprobs", ref_logprobs), ("tis_weights", tis_weights)):
        if tensor is not None and tensor.shape != ids.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} must equal ids shape "
                             f"{tuple(ids.shape)}")
    if advantages.shape == ids.shape[:1]:
        advantages = advantages[:, None]
    elif advantages.shape != ids.shape:
        raise ValueError(f"advantages shape {tuple(advantages.shape)} must be {tuple(ids.shape)} "
                         f"or {tuple(ids.shape[:1])}")
    logp, entropy = vocab_parallel_logprobs(logits, ids, tp_group, vocab_size,
                                            temperature=temperature, with_entropy=True,
                                            chunk_size=chunk_size)
    mask = loss_mask.to(logp.dtype)
    log_ratio = logp - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    if tis_weights is not None:
        per_token = per_token * tis_weights.detach()
    metrics = {}
    if ref_logprobs is not None:
        log_ref_ratio = ref_logprobs - logp
        kl = log_ref_ratio.exp() - log_ref_ratio - 1  # k3: unbiased, non-negative
        per_token = per_token + kl_coef * kl
        metrics["ref_kl"] = token_mean(kl.detach(), mask)
    loss = token_mean(per_token, mask, num_tokens)
    detached = log_ratio.detach()
    on_tokens = ratio.detach()[mask > 0]
    metrics.update(
        clip_fraction=token_mean((clipped < unclipped).to(mask.dtype), mask),
        ratio_mean=token_mean(ratio.detach(), mask),
        ratio_max=on_tokens.max() if on_tokens.numel() else ratio.new_ones(()),
        approx_kl=token_mean(detached.exp() - detached - 1, mask),
        entropy=token_mean(entropy.detach(), mask))
    return loss, metrics
