"""Scoring a batch of responses with one named reward.

A reward that raises, returns a non-finite value or (in the worker pool) runs past its timeout
scores 0 and is counted; `on_error="raise"` stops at the first such failure instead, and
`max_error_rate` stops the run once the failed fraction of all responses scored so far exceeds
it (a verifier that fails now and then is noise, one that always fails is a bug).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from opd_megatron.data.examples import PromptExample
from opd_megatron.rewards.pool import CallResult, RewardPool
from opd_megatron.rewards.registry import get_reward

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward failed on one example (on_error="raise") or too often (max_error_rate)."""


@dataclass(frozen=True)
class ScoredBatch:
    scores: list[float]
    num_errors: int = 0
    num_timeouts: int = 0
    # Example indices whose reward failed and was replaced by 0.
    failed_indices: list[int] = field(default_factory=list)


@dataclass
class RewardScorer:
    name: str
    on_error: Literal["raise", "zero"] = "raise"
    options: dict[str, Any] = field(default_factory=dict)
    # 0 scores in this process (no timeout); otherwise a pool of this many worker processes.
    workers: int = 0
    timeout: float = 10.0
    plugins: Sequence[str] = ()
    max_error_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {self.on_error!r}")
        self._fn = get_reward(self.name, **self.options)
        self._pool = (RewardPool(self.name, self.options, self.plugins, workers=self.workers,
                                 timeout=self.timeout) if self.workers else None)
        self.scored = self.failed = 0

    def __call__(self, responses: Sequence[str], examples: Sequence[PromptExample]) -> ScoredBatch:
        if len(responses) != len(examples):
            raise ValueError(f"reward '{self.name}': {len(responses)} responses for "
                             f"{len(examples)} examples")
        results = (self._pool.map(responses, examples) if self._pool is not None
                   else [self._call(r, e) for r, e in zip(responses, examples)])
        scores, failed, timeouts, first = [], [], 0, ""
        for result, example in zip(results, examples):
            score = result.score
            error = result.error
            if error is None and not math.isfinite(score):
                error = f"ValueError: non-finite reward {score}"
            if error is not None:
                message = _one_line(f"reward '{self.name}' failed on example index "
                                    f"{example.index}: {error}")
                if self.on_error == "raise":
                    raise RewardError(message)
                logger.warning(message)
                first = first or message
                score = 0.0
                failed.append(example.index)
                timeouts += result.timed_out
            scores.append(score)
        self.scored += len(scores)
        self.failed += len(failed)
        if self.failed > self.max_error_rate * self.scored:
            raise RewardError(f"reward '{self.name}': {self.failed} of {self.scored} responses "
                              f"failed so far ({self.failed / self.scored:.1%} > "
                              f"grpo.reward_max_error_rate={self.max_error_rate:g}); {first}")
        return ScoredBatch(scores=scores, num_errors=len(failed), num_timeouts=timeouts,
                           failed_indices=failed)

    def _call(self, response: str, example: PromptExample) -> CallResult:
        try:
            return CallResult(float(self._fn(response, example)))
        except Exception as e:  # noqa: BLE001 - counted and reported by __call__
            return CallResult(None, f"{type(e).__name__}: {e}")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


def _one_line(text: str) -> str:
    return " ".join(text.split())
