"""Log-probs, GRPO policy loss, SFT cross-entropy and the aggregation helpers at TP=1."""
from __future__ import annotations

import pytest
import torch

from opd_megatron.losses import (
    grpo_policy_loss,
    sequence_mean,
    token_mean,
    vocab_parallel_cross_entropy_loss,
    vocab_parallel_logprobs,
)
from tests.losses.compare import TOLERANCE, grpo_errors, grpo_inputs, logprobs_errors, sft_errors
from tests.losses.reference import make_case, reference_logprobs

CASE = make_case(2, top_k=4)
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])


@DTYPES
def test_logprobs_and_entropy_match_reference_and_leave_logits_intact(dtype):
    errors = logprobs_errors(CASE, dtype)
    assert max(errors.values()) < TOLERANCE[dtype], errors


@DTYPES
@pytest.mark.parametrize("per_sequence", [False, True], ids=["per_token", "per_sequence"])
def test_grpo_matches_reference(dtype, per_sequence):
    errors = grpo_errors(CASE, dtype, per_sequence)
    assert max(errors.values()) < TOLERANCE[dtype], errors


def test_grpo_clipping_zeroes_gradient_outside_the_asymmetric_range():
    """One token per regime: inside, above 1 + clip_high with A > 0, below 1 - clip_low with A < 0,
    and outside the range on the side where the clip does not bind."""
    vocab = 8
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, vocab, dtype=torch.float64, generator=g)
    ids = torch.tensor([[1, 2, 3, 4]])
    logp, _ = reference_logprobs(logits, ids)
    ratios = torch.tensor([[1.1, 1.5, 0.5, 1.5]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    logits.requires_grad_()
    loss, metrics = grpo_policy_loss(logits, ids, logp - ratios.log(), advantages,
                                     torch.ones(1, 4))
    loss.backward()
    token_grad_norm = logits.grad.norm(dim=-1)[0]
    assert token_grad_norm[0] > 0 and token_grad_norm[3] > 0
    assert token_grad_norm[1] == 0 and token_grad_norm[2] == 0
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
    assert metrics["ratio_mean"].item() == pytest.approx(ratios.mean().item())
    # Clipped at 1.28 and 0.8; the unclipped 1.5 with A < 0 enters as -(-1.5).
    assert loss.item() == pytest.approx((-1.1 - 1.28 + 0.8 + 1.5) / 4)


def test_grpo_token_mean_and_global_token_count():
    inputs = grpo_inputs(CASE, per_sequence=True)
    loss, _ = grpo_policy_loss(CASE["student"], CASE["sampled"], loss_mask=CASE["mask"],
                               vocab_size=CASE["vocab_size"], **inputs)
    tokens = CASE["mask"].sum()
    halved, _ = grpo_policy_loss(CASE["student"], CASE["sampled"], loss_mask=CASE["mask"],
                                 vocab_size=CASE["vocab_size"], num_tokens=2 * tokens, **inputs)
    torch.testing.assert_close(halved, loss / 2)


def test_grpo_rejects_mismatched_advantages():
    with pytest.raises(ValueError, match="advantages"):
        grpo_policy_loss(CASE["student"], CASE["sampled"], torch.zeros(2, 5), torch.zeros(3),
                         torch.ones(2, 5))


@DTYPES
def test_sft_matches_torch_cross_entropy(dtype):
    errors = sft_errors(CASE, dtype)
    assert max(errors.values()) < TOLERANCE[dtype], errors


def test_logprobs_rejects_bad_ids():
    with pytest.raises(ValueError, match="ids"):
        vocab_parallel_logprobs(CASE["student"], CASE["sampled"][:, :3])
    with pytest.raises(ValueError, match="outside"):
        vocab_parallel_logprobs(CASE["student"], torch.full((2, 5), 43), vocab_size=43)


def test_sft_all_masked_is_zero_not_nan():
    logits = CASE["student"].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy_loss(logits, torch.full((2, 5), -100),
                                             torch.zeros(2, 5), vocab_size=43)
    loss.backward()
    assert loss.item() == 0 and (logits.grad == 0).all()


def test_token_mean_and_sequence_mean():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert token_mean(values, mask).item() == pytest.approx(16 / 4)
    assert sequence_mean(values, mask).item() == pytest.approx((2 + 10) / 2)
    assert token_mean(values, torch.zeros_like(mask)).item() == 0
    assert token_mean(values).item() == pytest.approx(values.mean().item())
