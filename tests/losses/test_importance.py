"""Truncated importance sampling weights, and GRPO's loss with them and its PPO diagnostics."""
import math

import pytest
import torch

from opd_megatron.losses import grpo_policy_loss
from opd_megatron.losses.importance import truncated_is_weights
from tests.losses.reference import reference_logprobs


def test_tis_weights_equal_the_capped_ratio_on_a_constructed_mismatch():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    # The engine over-rates token 0, matches token 1, under-rates tokens 2 and 3 (3 far below).
    engine = trainer + torch.tensor([[0.3, 0.0, -0.2, -2.0]])
    weights = truncated_is_weights(trainer, engine, cap=2.0)
    expected = torch.tensor([[math.exp(-0.3), 1.0, math.exp(0.2), 2.0]])
    assert torch.allclose(weights, expected, atol=1e-6)
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(trainer, engine, cap=0.0)


def test_tis_weights_scale_each_tokens_policy_gradient_and_carry_none():
    vocab = 8
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 3, vocab, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([[1, 5, 2]])
    old = reference_logprobs(logits.detach(), ids)[0]
    advantages = torch.tensor([1.0], dtype=torch.float64)
    weights = torch.tensor([[0.5, 1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    per_token_grads = []
    for tis in (None, weights):
        logits.grad = None
        loss, metrics = grpo_policy_loss(logits, ids, old, advantages, torch.ones(1, 3),
                                         tis_weights=tis)
        loss.backward()
        per_token_grads.append(logits.grad.clone())
    plain, weighted = per_token_grads
    for token, weight in enumerate((0.5, 1.0, 2.0)):
        assert torch.allclose(weighted[0, token], weight * plain[0, token])
    assert weights.grad is None


def test_ppo_diagnostics_on_a_policy_that_moved():
    vocab = 6
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, vocab, dtype=torch.float64, generator=g)
    ids = torch.tensor([[0, 1, 2]])
    logp = reference_logprobs(logits, ids)[0]
    ratios = torch.tensor([[1.0, 1.6, 0.7]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]])     # the 0.7 token is not a loss token
    _, metrics = grpo_policy_loss(logits, ids, logp - ratios.log(), torch.ones(1), mask)
    assert metrics["ratio_max"].item() == pytest.approx(1.6)
    k3 = [r - 1 - math.log(r) for r in (1.0, 1.6)]    # KL(old || new) per token, k3
    assert metrics["approx_kl"].item() == pytest.approx(sum(k3) / 2)
    assert metrics["clip_fraction"].item() == pytest.approx(0.5)
