"""DAPO's dynamic sampling and overlong reward shaping for GRPO rollout batches.

A prompt group whose rewards are all equal has zero advantage everywhere: it costs a forward
and backward pass and contributes no gradient, so the effective batch shrinks as the policy
masters (or gives up on) prompts. Dynamic sampling drops such groups and draws more prompts
until the batch holds as many informative groups as it should (Yu et al., DAPO, 2025).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Draw:
    """One round of sampling: per rollout, its example, the rollout and its (shaped) reward;
    prompt-major, `group_size` consecutive rollouts per prompt. `num_correct` counts responses
    the verifier accepted (before shaping)."""

    examples: list
    rollouts: list
    rewards: list[float]
    num_correct: int = 0
    num_errors: int = 0
    num_timeouts: int = 0


@dataclass
class FilledBatch:
    examples: list = field(default_factory=list)
    rollouts: list = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[num_groups] bool: the group's rewards are not all equal."""
    groups = rewards.view(-1, group_size)
    return groups.max(dim=1).values > groups.min(dim=1).values


def fill_batch(draw: Callable[[int], Draw], num_groups: int, group_size: int, *,
               dynamic: bool, max_draws: int) -> FilledBatch:
    """`num_groups` groups from `draw(0)`, `draw(1)`, ...: every group of the first draw when not
    `dynamic`, otherwise informative groups only, drawing up to `max_draws` times and topping
    up with dropped groups (no gradient, kept so every step has the same shape).

    stats: the mean reward, accuracy, errors and timeouts over every drawn response; with `dynamic`, the
    number of draws, the fraction of drawn groups kept and the groups topped up.
    """
    kept, dropped, drawn_rewards = [], [], []
    errors = timeouts = draws = correct = 0
    while draws < (max_draws if dynamic else 1) and len(kept) < num_groups:
        result = draw(draws)
        draws += 1
        errors, timeouts = errors + result.num_errors, timeouts + result.num_timeouts
        correct += result.num_correct
        drawn_rewards += result.rewards
        rewards = torch.tensor(result.rewards, dtype=torch.float32)
        useful = informative_groups(rewards, group_size) if dynamic else \
            torch.ones(len(rewards) // group_size, dtype=torch.bool)
        for index, keep in enumerate(useful.tolist()):
            rows = slice(index * group_size, (index + 1) * group_size)
            group = (result.examples[rows], result.rollouts[rows], result.rewards[rows])
            (kept if keep else dropped).append(group)
    topped_up = max(0, num_groups - len(kept))
    chosen = kept[:num_groups] + dropped[:topped_up]
    out = FilledBatch()
    for examples, rollouts, rewards in chosen:
        out.examples += examples
        out.rollouts += rollouts
        out.rewards += rewards
    count = max(len(drawn_rewards), 1)
    out.stats = {"reward": sum(drawn_rewards) / count, "accuracy": correct / count,
                 "reward/errors": float(errors), "reward/timeouts": float(timeouts)}
    if dynamic:
        drawn_groups = len(drawn_rewards) // group_size
        out.stats.update({"dynamic/draws": float(draws),
                          "dynamic/kept_fraction": len(kept) / max(drawn_groups, 1),
                          "dynamic/topped_up": float(topped_up)})
    return out


def overlong_penalty(response_lengths: torch.Tensor, max_new_tokens: int, buffer: int,
                     penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment, <= 0 per response: 0 up to max_new_tokens - buffer, then
    linear down to -penalty at max_new_tokens."""
    if buffer <= 0:
        return torch.zeros(response_lengths.shape)
    excess = (response_lengths.float() - (max_new_tokens - buffer)).clamp(min=0)
    return -penalty * (excess / buffer).clamp(max=1.0)
