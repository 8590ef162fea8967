from __future__ import annotations

import threading

import pytest

from opd_megatron.data.examples import PromptExample
from opd_megatron.rewards.registry import get_reward


def example(answer: str, index: int = 0) -> PromptExample:
    return PromptExample(messages=[{"role": "user", "content": "q"}], answer=answer, index=index)


@pytest.mark.parametrize("gold, response", [
    ("357", "so \\boxed{357}"),
    ("1/2", "\\boxed{0.5}"),
    ("0.5", "the answer is \\boxed{\\frac{1}{2}}"),
    ("\\frac{1}{2}", "\\boxed{1/2}"),
    ("\\frac12", "\\boxed{\\dfrac{1}{2}}"),
    ("x+1", "\\boxed{1+x}"),
    ("\\boxed{4}", "$4$"),
])
def test_math_equivalent_forms(gold, response):
    assert get_reward("math")(response, example(gold)) == 1.0


@pytest.mark.parametrize("gold, response", [("357", "\\boxed{356}"), ("1/2", "\\boxed{0.51}"),
                                            ("3", "no answer here")])
def test_math_wrong(gold, response):
    assert get_reward("math")(response, example(gold)) == 0.0


def test_math_outside_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(
        get_reward("math")("\\boxed{\\frac{2}{4}}", example("0.5"))))
    worker.start()
    worker.join()
    assert results == [1.0]


def test_exact_match():
    reward = get_reward("exact_match")
    assert reward("7+5=12, so 12\n\\boxed{12}", example("12")) == 1.0
    assert reward("\\boxed{ 12 }", example("12")) == 1.0
    assert reward("\\boxed{12.0}", example("12")) == 0.0
    assert reward("12", example("12")) == 0.0
    assert reward("\\boxed{11} \\boxed{12}", example("12")) == 1.0


def test_format_rule():
    reward = get_reward("format_rule")
    assert reward("work\nANSWER: 12", example("12")) == 1.0
    assert reward("work\nANSWER: 13", example("12")) == 0.0
    assert reward("\\boxed{12}", example("12")) == 0.0
    compliance_only = get_reward("format_rule", require_correct=False)
    assert compliance_only("ANSWER: 13", example("12")) == 1.0
    assert compliance_only("13", example("12")) == 0.0
