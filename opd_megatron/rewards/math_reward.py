"""`math`: 1.0 when math-verify finds the response's answer equivalent to the gold answer.

math-verify's timeouts use signal.alarm, which only works in the main thread: there they stay on,
elsewhere (a rollout worker thread) they are turned off rather than raising.
"""
from __future__ import annotations

import threading

from opd_megatron.data.examples import PromptExample
from opd_megatron.rewards.registry import register_reward

TIMEOUT_SECONDS = 5


@register_reward("math")
def math_reward(response: str, example: PromptExample) -> float:
    from math_verify import parse, verify

    timeout = TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None
    # A bare gold "1/2" or "x+1" is not found by the LaTeX extractor; boxing it always is.
    gold_text = example.answer if "\\boxed" in example.answer else f"\\boxed{{{example.answer}}}"
    gold = parse(gold_text, parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math-verify cannot parse the gold answer {example.answer!r}")
    prediction = parse(response, parsing_timeout=timeout)
    return float(verify(gold, prediction, timeout_seconds=timeout))
