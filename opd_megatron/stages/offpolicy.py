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
    return _token_reduce(outputs, "mismatch_tokens",
                         means={"rollout/logprob_diff_mean": "mismatch_abs_sum",
                                "gen_kl_error": "mismatch_kl_sum"},
                         maxima={"rollout/logprob_diff_max": "mismatch_abs_max"})


def tis_sums(weights: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = mask.to(weights.dtype)
    on_tokens = weights[mask > 0]
    return {"tis_weight_sum": (weights * mask).sum(),
            "tis_weight_max": on_tokens.max() if on_tokens.numel() else weights.new_zeros(()),
            "tis_tokens": mask.sum()}


def tis_metrics(outputs: list[dict]) -> dict[str, float]:
    """tis/weight_mean and tis/weight_max over response tokens."""
    return _token_reduce(outputs, "tis_tokens", means={"tis/weight_mean": "tis_weight_sum"},
                         maxima={"tis/weight_max": "tis_weight_max"})


def _token_reduce(outputs: list[dict], tokens: str, *, means: dict[str, str],
                  maxima: dict[str, str]) -> dict[str, float]:
    """Per-token means (sums over micro-batches / their token count) and maxima of the
    micro-batch outputs that carry `tokens`; {} when none does."""
    outputs = [o for o in outputs if tokens in o]
    if not outputs:
        return {}
    count = max(sum(float(o[tokens]) for o in outputs), 1.0)
    out = {name: sum(float(o[key]) for o in outputs) / count for name, key in means.items()}
    out.update({name: max(float(o[key]) for o in outputs) for name, key in maxima.items()})
    return out
