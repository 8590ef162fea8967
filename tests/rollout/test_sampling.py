"""The pure sampling math: temperature, top-k, top-p, seeded per-row draws."""
import math

import pytest
import torch

from opd_megatron.rollout.base import SamplingParams
from opd_megatron.rollout.sampling import (
    choose_tokens,
    row_generators,
    sampling_logprobs,
    truncate,
)

NEG_INF = float("-inf")


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [row.isfinite().nonzero()[:, 0].tolist() for row in logits]


def log(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def test_logprobs_are_tempered_and_greedy_reports_t1():
    logits = torch.randn(3, 11, dtype=torch.float64)
    assert torch.allclose(sampling_logprobs(logits, 0.5), torch.log_softmax(logits * 2, -1).float())
    assert torch.equal(sampling_logprobs(logits, 0.0), sampling_logprobs(logits, 1.0))
    assert sampling_logprobs(logits.half(), 1.0).dtype == torch.float32


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert kept(truncate(logits, top_k=2)) == [[1, 3], [0, 1]]
    assert torch.equal(truncate(logits, top_k=2)[0, [1, 3]], logits[0, [1, 3]])


def test_top_k_keeps_ties_and_is_off_at_zero_or_full_vocab():
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert kept(truncate(logits, top_k=1)) == [[1, 2]]
    assert torch.equal(truncate(logits, top_k=0), logits)
    assert torch.equal(truncate(logits, top_k=4), logits)


@pytest.mark.parametrize("top_p, expected", [(1.0, [0, 1, 2, 3]), (0.99, [0, 1, 2, 3]),
                                             (0.85, [1, 2, 3]), (0.75, [1, 3]), (0.45, [3]),
                                             (1e-6, [3])])
def test_top_p_keeps_the_smallest_nucleus_reaching_p(top_p, expected):
    # Unsorted on purpose: probabilities 0.05, 0.3, 0.15, 0.5.
    assert kept(truncate(log([0.05, 0.3, 0.15, 0.5]), top_p=top_p)) == [expected]


def test_top_p_rows_are_independent():
    logits = torch.cat([log([0.5, 0.3, 0.2]), log([0.9, 0.05, 0.05])])
    assert kept(truncate(logits, top_p=0.7)) == [[0, 1], [0]]


def test_top_p_applies_to_the_renormalised_top_k():
    # After top_k=2 the distribution is 4/7, 3/7: a nucleus of 0.5 is the first token alone
    # (over the original 0.4, 0.3, ... it would hold both).
    logits = log([0.4, 0.3, 0.2, 0.1])
    assert kept(truncate(logits, top_k=2, top_p=0.5)) == [[0]]


def test_greedy_is_argmax_without_drawing():
    logprobs = torch.log_softmax(torch.randn(4, 50), -1)
    tokens = choose_tokens(logprobs, SamplingParams(temperature=0), [])
    assert torch.equal(tokens, logprobs.argmax(-1))


def test_seeded_draws_are_reproducible_and_per_row():
    logprobs = torch.log_softmax(torch.zeros(4, 1000), -1)
    params = SamplingParams(temperature=1.0)
    first = choose_tokens(logprobs, params, row_generators(3, range(4)))
    again = choose_tokens(logprobs, params, row_generators(3, range(4)))
    other = choose_tokens(logprobs, params, row_generators(4, range(4)))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len(set(first.tolist())) > 1                   # rows draw different streams
    # A row's draw depends on its id, not on which other rows share the batch.
    alone = choose_tokens(logprobs[2:3], params, row_generators(3, [2]))
    assert alone.item() == first[2].item()


def test_unseeded_generators_differ():
    a, b = row_generators(None, [0, 0])
    assert torch.rand(4, generator=a).tolist() != torch.rand(4, generator=b).tolist()


def test_draws_follow_the_truncated_distribution():
    probs = [0.45, 0.25, 0.15, 0.1, 0.05]
    logprobs = log(probs).expand(4000, -1)
    params = SamplingParams(temperature=1.0, top_k=4, top_p=0.8)
    tokens = choose_tokens(logprobs, params, row_generators(0, range(4000)))
    # top_k=4 then top_p=0.8 over 0.45/0.95, 0.25/0.95, ...: tokens 0, 1 and 2 remain.
    counts = torch.bincount(tokens, minlength=5).double() / len(tokens)
    expected = torch.tensor([0.45, 0.25, 0.15, 0, 0]) / 0.85
    assert torch.allclose(counts, expected.double(), atol=0.03)
    assert counts[3:].sum() == 0


def test_temperature_sharpens_draws():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(3000, -1)
    cold = choose_tokens(sampling_logprobs(logits, 0.25), SamplingParams(temperature=0.25),
                         row_generators(0, range(3000)))
    share = (cold == 0).double().mean().item()
    assert share == pytest.approx(1 / (1 + math.exp(-4) + math.exp(-8)), abs=0.02)
