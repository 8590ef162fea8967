"""`format_rule`: compliance with the synthetic system-prompt rule (an `ANSWER: <n>` last line)."""
from __future__ import annotations

from opd_megatron.data.answer_format import extract_rule_answer
from opd_megatron.data.examples import PromptExample
from opd_megatron.rewards.registry import register_reward


@register_reward("format_rule")
def format_rule(response: str, example: PromptExample, *, require_correct: bool = True) -> float:
    """1.0 for a compliant reply; with `require_correct` (default) its number must also be right,
    so the reward cannot be earned by the format alone."""
    answer = extract_rule_answer(response)
    if answer is None:
        return 0.0
    return float(not require_correct or answer == example.answer.strip())
