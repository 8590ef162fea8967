"""The engine's log-probs ride in every rollout micro-batch, aligned with the labels (GRPO's
π_old); the mismatch reduction; per-phase timers."""
import time

import pytest
import torch

from opd_megatron.data.tiny_tokenizer import build_tiny_tokenizer
from opd_megatron.data.tokenizer import load_tokenizer
from opd_megatron.rollout.base import Rollout
from opd_megatron.stages.offpolicy import mismatch_metrics
from opd_megatron.stages.rollouts import rollout_batch
from opd_megatron.stages.timing import PHASES, PhaseTimer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(build_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_engine_logprobs_sit_on_the_labels_they_score(tokenizer):
    rollouts = [Rollout(0, [5, 6, 7], [8, 9], [-0.5, -1.5], "stop"),
                Rollout(1, [5, 6], [10, 11, 12, 13], [-0.1, -0.2, -0.3, -0.4], "length")]
    (mb,) = rollout_batch(tokenizer, ["a", "b"], rollouts, micro_batch_size=2).microbatches
    engine, labels, mask = mb["engine_logprobs"], mb["labels"], mb["loss_mask"]
    assert engine.shape == labels.shape
    for row, rollout in enumerate(rollouts):
        on = mask[row] > 0
        assert labels[row][on].tolist() == rollout.response_ids
        assert engine[row][on].tolist() == pytest.approx(rollout.logprobs)
        assert (engine[row][~on] == 0).all()


def test_rollout_with_missing_logprobs_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="rollout 0: 1 log-probs for 2 response tokens"):
        rollout_batch(tokenizer, ["a"], [Rollout(0, [5], [8, 9], [-1.0], "stop")], 1)


def test_mismatch_metrics_reduce_over_micro_batches():
    outputs = [{"mismatch_abs_sum": torch.tensor(2.0), "mismatch_abs_max": torch.tensor(0.5),
                "mismatch_kl_sum": torch.tensor(0.2), "mismatch_tokens": torch.tensor(4.0)},
               {"mismatch_abs_sum": torch.tensor(1.0), "mismatch_abs_max": torch.tensor(0.9),
                "mismatch_kl_sum": torch.tensor(0.1), "mismatch_tokens": torch.tensor(2.0)},
               {"loss_sum": torch.tensor(1.0)}]
    assert mismatch_metrics(outputs) == pytest.approx({
        "rollout/logprob_diff_mean": 0.5, "rollout/logprob_diff_max": 0.9, "gen_kl_error": 0.05})


def test_phase_timer_reports_every_phase_and_resets():
    timer = PhaseTimer()
    with timer.phase("generate"):
        time.sleep(0.02)
    with timer.phase("generate"):
        time.sleep(0.01)
    first = timer.take()
    assert set(first) == {f"time/{p}" for p in PHASES}
    assert first["time/generate"] >= 0.03 and first["time/train"] == 0
    assert timer.take()["time/generate"] == 0
    with pytest.raises(ValueError, match="unknown phase"):
        with timer.phase("nap"):
            pass
