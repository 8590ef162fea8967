"""`exact_match`: the last `\\boxed{...}` of the response equals the gold answer as a string."""
from __future__ import annotations

from opd_megatron.data.answer_format import extract_boxed
from opd_megatron.data.examples import PromptExample
from opd_megatron.rewards.registry import register_reward


@register_reward("exact_match")
def exact_match(response: str, example: PromptExample) -> float:
    predicted = extract_boxed(response)
    return float(predicted is not None and predicted.strip() == example.answer.strip())
