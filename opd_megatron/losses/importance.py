"""Truncated importance sampling (TIS) for the rollout engine / trainer mismatch.

The engine samples from π_engine (e.g. bf16 vLLM) while the trainer computes π_trainer (e.g. FP8
Megatron) at the same weights; a policy gradient estimated on engine samples is reweighted by
π_trainer / π_engine per token, truncated at `cap` so that rare tokens the engine under-rates
cannot blow up the gradient (Yao et al., "Your efficient RL framework secretly brings you
off-policy RL training", 2025). The weights are constants: no gradient flows through them.
"""
from __future__ import annotations

import torch


def truncated_is_weights(trainer_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
                         cap: float) -> torch.Tensor:
    """min(exp(trainer - engine), cap), detached; same shape as the inputs."""
    if cap <= 0:
        raise ValueError(f"TIS cap {cap} must be > 0")
    log_ratio = (trainer_logprobs.detach() - engine_logprobs.to(trainer_logprobs.dtype))
    return log_ratio.exp().clamp(max=cap)
