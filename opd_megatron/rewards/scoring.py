"""Scoring a batch of responses with one named reward, failing or zeroing on reward errors."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from opd_megatron.data.examples import PromptExample
from opd_megatron.rewards.registry import get_reward

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward function raised (or returned a non-finite value) on one example."""


@dataclass(frozen=True)
class ScoredBatch:
    scores: list[float]
    num_errors: int = 0
    # Example indices whose reward failed and was replaced by 0 (on_error="zero").
    failed_indices: list[int] = field(default_factory=list)


@dataclass
class RewardScorer:
    name: str
    on_error: Literal["raise", "zero"] = "raise"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {self.on_error!r}")
        self._fn = get_reward(self.name, **self.options)

    def __call__(self, responses: Sequence[str], examples: Sequence[PromptExample]) -> ScoredBatch:
        if len(responses) != len(examples):
            raise ValueError(f"reward '{self.name}': {len(responses)} responses for "
                             f"{len(examples)} examples")
        scores, failed = [], []
        for response, example in zip(responses, examples):
            try:
                score = float(self._fn(response, example))
                if not math.isfinite(score):
                    raise ValueError(f"non-finite reward {score}")
            except Exception as e:
                message = _one_line(f"reward '{self.name}' failed on example index {example.index}: "
                                    f"{type(e).__name__}: {e}")
                if self.on_error == "raise":
                    raise RewardError(message) from e
                logger.warning(message)
                score = 0.0
                failed.append(example.index)
            scores.append(score)
        return ScoredBatch(scores=scores, num_errors=len(failed), failed_indices=failed)


def _one_line(text: str) -> str:
    return " ".join(text.split())
