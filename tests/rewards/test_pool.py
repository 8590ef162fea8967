"""Rewards in worker processes: a hanging verifier is cut off at its timeout and counted, a
raising one scores zero and is counted, and the run stops only past the configured error rate."""
import time

import pytest

from opd_megatron.data.examples import PromptExample
from opd_megatron.rewards.scoring import RewardError, RewardScorer
from tests.rewards import slow_rewards  # noqa: F401 - registers the rewards here too

PLUGIN = ("tests.rewards.slow_rewards",)


def examples(n):
    return [PromptExample(messages=[{"role": "user", "content": "q"}], answer="1", index=i)
            for i in range(n)]


@pytest.fixture
def scorer():
    scorer = RewardScorer("hangs_on_request", on_error="zero", workers=2, timeout=1.0,
                          plugins=PLUGIN, max_error_rate=0.5)
    yield scorer
    scorer.close()


def test_hanging_verifier_is_cut_off_at_its_timeout_and_counted(scorer):
    scorer(["ok"], examples(1))           # workers started; startup is not a call
    begin = time.monotonic()
    scored = scorer(["ok", "hang", "ok", "raise", "ok", "ok"], examples(6))
    elapsed = time.monotonic() - begin
    assert scored.scores == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert scored.num_errors == 2 and scored.num_timeouts == 1 and scored.failed_indices == [1, 3]
    # The hung call was waited out for its 1 s timeout, not forever (the bound leaves room for
    # respawning its worker on a loaded machine).
    assert 1.0 <= elapsed < 30.0
    # The killed worker was replaced: the pool still scores.
    assert scorer(["ok", "ok"], examples(2)).scores == [1.0, 1.0]


def test_run_stops_only_past_the_error_rate(scorer):
    scorer(["ok", "ok", "raise"], examples(3))             # 1 of 3 failed: under 0.5
    with pytest.raises(RewardError, match=r"3 of 5 responses failed so far \(60.0% > "
                                          r"grpo.reward_max_error_rate=0.5\); reward "
                                          r"'hangs_on_request' failed on example index 0: "
                                          r"ValueError: cannot parse"):
        scorer(["raise", "raise"], examples(2))


def test_in_process_scorer_counts_errors_without_a_pool():
    scored = RewardScorer("hangs_on_request", on_error="zero", plugins=PLUGIN)(
        ["ok", "raise"], examples(2))
    assert scored.scores == [1.0, 0.0] and scored.num_errors == 1 and scored.num_timeouts == 0
