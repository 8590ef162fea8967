from __future__ import annotations

import pytest

from opd_megatron.data.examples import PromptExample
from opd_megatron.rewards import registry
from opd_megatron.rewards.registry import get_reward, register_reward, reward_names
from opd_megatron.rewards.scoring import RewardError, RewardScorer


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def examples(*answers: str) -> list[PromptExample]:
    return [PromptExample(messages=[{"role": "user", "content": "q"}], answer=a, index=10 + i)
            for i, a in enumerate(answers)]


def test_builtins_are_registered():
    assert {"math", "exact_match", "format_rule"} <= set(reward_names())


def test_unknown_reward_lists_known_names():
    with pytest.raises(KeyError, match="unknown reward 'nope'; known rewards: .*exact_match.*math"):
        get_reward("nope")


def test_unknown_option():
    with pytest.raises(TypeError, match=r"reward 'math' has no options \['strict'\]; its options: none"):
        get_reward("math", strict=True)


def test_register_custom_reward(clean_registry):
    @register_reward("length")
    def length(response, example, *, scale: float = 1.0):
        return scale * len(response)

    assert get_reward("length", scale=0.5)("abcd", examples("x")[0]) == 2.0
    with pytest.raises(ValueError, match="reward 'length' is already registered"):
        register_reward("length")(lambda response, example: 0.0)


def test_scorer_scores_batch():
    scored = RewardScorer("exact_match")(["\\boxed{1}", "\\boxed{3}"], examples("1", "2"))
    assert scored.scores == [1.0, 0.0] and scored.num_errors == 0


def test_scorer_reports_failing_example_and_reward(clean_registry):
    @register_reward("fragile")
    def fragile(response, example):
        if example.answer == "bad":
            raise ZeroDivisionError("division\nby zero")
        return 1.0

    with pytest.raises(RewardError) as info:
        RewardScorer("fragile")(["a", "b", "c"], examples("1", "bad", "3"))
    assert str(info.value) == ("reward 'fragile' failed on example index 11: "
                               "ZeroDivisionError: division by zero")

    scored = RewardScorer("fragile", on_error="zero")(["a", "b", "c"], examples("1", "bad", "bad"))
    assert scored.scores == [1.0, 0.0, 0.0]
    assert scored.num_errors == 2 and scored.failed_indices == [11, 12]


def test_scorer_rejects_non_finite_and_bad_config(clean_registry):
    register_reward("nan")(lambda response, example: float("nan"))
    with pytest.raises(RewardError, match="reward 'nan' failed on example index 10: ValueError: non-finite"):
        RewardScorer("nan")(["a"], examples("1"))
    with pytest.raises(ValueError, match="on_error must be"):
        RewardScorer("math", on_error="ignore")
    with pytest.raises(ValueError, match="2 responses for 1 examples"):
        RewardScorer("math")(["a", "b"], examples("1"))


def test_math_reward_with_unparseable_gold_is_reported():
    scored = RewardScorer("math", on_error="zero")(["\\boxed{1}"], examples("}{"))
    assert scored.num_errors == 1
