"""How far the rollout engine's distribution is from the trainer's, and the TIS weights that
correct for it, reduced from the micro-batch outputs of a step.

The trainer's log-probs of the sampled tokens, at the weights the engine sampled with, are
compared with the engine's own: `rollout/logprob_diff_mean` and `_max` (|trainer - engine| per
response token) and `gen_kl_error` (k3 estimate of KL(engine || trainer) on the engine's samples).
In fp32 on the native engine they agree to float rounding; bf16 vLLM against an FP8 trainer
does not, which is what `rollout.tis_cap` corrects.
"""
from __future__ import annotations

import torch

from opd_megatron.losses import vocab_parallel_logprobs


def mismatch_sums(logits: torch.Tensor, labels: torch.Tensor, engine: torch.Tensor,
                  mask: torch.Tensor, vocab_size: int, temperature: float) -> dict[str, torch.Tensor]:
    """One micro-batch's comparison (logits: this rank's vocab shard), for `mismatch_metrics`."""
    with torch.no_grad():
        trainer = vocab_parallel_logprobs(logits.detach(), labels, vocab_size=vocab_size,
                                          temperature=temperature)
        mask = mask.to(trainer.dtype)
        log_ratio = (trainer - engine.to(trainer.dtype)) * mask
        return {"mismatch_abs_sum": log_ratio.abs().sum(), "mismatch_abs_max": log_ratio.abs().max(),
                "mismatch_kl_sum": ((log_ratio.exp() - log_ratio - 1) * mask).sum(),
                "mismatch_tokens": mask.sum()}


def mismatch_metrics(outputs: list[dict]) -> dict[str, float]:
    outputs = [o for o in outputs if "mismatch_tokens" in o]
    if not outputs:
        return {}
    tokens = max(sum(float(o["mismatch_tokens"]) for o in outputs), 1.0)
    return {"rollout/logprob_diff_mean": sum(float(o["mismatch_abs_sum"]) for o in outputs) / tokens,
            "rollout/logprob_diff_max": max(float(o["mismatch_abs_max"]) for o in outputs),
            "gen_kl_error": sum(float(o["mismatch_kl_sum"]) for o in outputs) / tokens}


def tis_sums(weights: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = mask.to(weights.dtype)
    on_tokens = weights[mask > 0]
    return {"tis_weight_sum": (weights * mask).sum(),
            "tis_weight_max": on_tokens.max() if on_tokens.numel() else weights.new_zeros(()),
            "tis_tokens": mask.sum()}


def tis_metrics(outputs: list[dict]) -> dict[str, float]:
    """tis/weight_mean and tis/weight_max over response tokens."""
    outputs = [o for o in outputs if "tis_tokens" in o]
    if not outputs:
        return {}
    tokens = max(sum(float(o["tis_tokens"]) for o in outputs), 1.0)
    return {"tis/weight_mean": sum(float(o["tis_weight_sum"]) for o in outputs) / tokens,
            "tis/weight_max": max(float(o["tis_weight_max"]) for o in outputs)}
