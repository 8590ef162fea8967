"""The rollout interface every sampling engine implements (native Megatron, vLLM).

Stages only ever call `generate`, and `update_weights` after each optimizer step, so an engine can
be swapped by configuration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 disables top-k filtering
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1                           # samples per prompt (GRPO groups)
    seed: int | None = None
    # Return the engine's top-K token ids and log-probs at every response position (OPD's
    # `support: given`); 0 disables.
    return_top_k: int = 0
    # Whether the caller reads `Rollout.logprobs`. Evaluation does not, so an engine may sample
    # where it cannot report the contract's log-probs (vLLM then fills them with NaN).
    logprobs: bool = True

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0 or self.max_new_tokens < 1 or self.n < 1 or self.return_top_k < 0:
            raise ValueError("sampling.top_k/return_top_k must be >= 0 and "
                             "sampling.max_new_tokens/n must be >= 1")


@dataclass
class Rollout:
    """One sampled response. Log-probs are of the sampling distribution (after temperature,
    before top-p/top-k truncation), one per response token."""

    prompt_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    top_k_ids: list[list[int]] | None = None
    top_k_logprobs: list[list[float]] | None = None
    extra: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]:
        """Sample `sampling.n` responses per prompt; returned prompt-major (prompt 0's n
        samples first). Collective over the model-parallel group: every TP/PP rank of a DP
        replica passes the same prompts and gets the same rollouts."""
        ...

    def update_weights(self, chunks: list[torch.nn.Module]) -> None:
        """Make the engine sample from the given (just updated) Megatron student weights."""
        ...
