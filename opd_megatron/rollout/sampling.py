"""Next-token choice from full-vocabulary logits: temperature, top-k, top-p, seeded draws.

Pure tensor functions, no distributed state: the native engine calls them on one rank and
broadcasts the result, so every TP/PP rank ends up with the same tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch

from opd_megatron.rollout.base import SamplingParams


def sampling_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) in fp32, [..., V]: the distribution rollouts report log-probs of.

    Greedy decoding (T = 0) reports the untempered (T = 1) distribution, which is what a
    teacher-forced forward of the same tokens gives.
    """
    return torch.log_softmax(logits.float() / (temperature or 1.0), dim=-1)


def truncate(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """`logits` [rows, V] with every token outside the top-k set and the top-p nucleus at -inf.

    Top-k first, then top-p over what is left (the order transformers uses). Tokens tied with
    the k-th largest logit are kept; the nucleus is the smallest prefix of the sorted
    distribution whose mass reaches `top_p` and always holds the most likely token.
    """
    out = logits
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def row_generators(seed: int | None, row_ids: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sampled sequence, keyed by the sequence's global row id.

    Keying by row (not by batch) makes a seeded sample independent of how rows are batched, of
    the other prompts in the call and of the parallel layout. Without a seed, each draws fresh
    OS entropy.
    """
    generators = []
    for row in row_ids:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            # Distinct seeds per row; mt19937 streams from distinct seeds are uncorrelated.
            generator.manual_seed((seed * 1_000_003 + row) % (1 << 63))
        generators.append(generator)
    return generators


def choose_tokens(logprobs: torch.Tensor, sampling: SamplingParams,
                  generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token ids [rows] from `sampling_logprobs` output [rows, V]; row i draws with
    `generators[i]` (unused when greedy)."""
    if sampling.temperature == 0:
        return logprobs.argmax(dim=-1)
    probs = torch.softmax(truncate(logprobs, sampling.top_k, sampling.top_p), dim=-1)
    return torch.cat([torch.multinomial(row, 1, generator=generator)
                      for row, generator in zip(probs, generators, strict=True)])
