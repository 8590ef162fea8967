"""DAPO dynamic sampling keeps only groups with a reward spread; overlong shaping."""
import torch

from opd_megatron.stages.dynamic_sampling import (
    Draw,
    fill_batch,
    informative_groups,
    overlong_penalty,
)


def draws(*reward_lists, group_size=2):
    """draw(i) returns the i-th reward list as groups of prompts named by draw and group."""
    calls = []

    def draw(index):
        calls.append(index)
        rewards = reward_lists[index]
        names = [f"d{index}g{row // group_size}" for row in range(len(rewards))]
        return Draw(examples=names, rollouts=names, rewards=list(rewards),
                    num_correct=sum(r > 0.5 for r in rewards), num_errors=index)
    return draw, calls


def test_informative_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    assert informative_groups(rewards, 2).tolist() == [False, True, False, False]


def test_dynamic_sampling_drops_all_equal_groups_and_draws_until_full():
    draw, calls = draws([1, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 1], [1, 0, 1, 0, 1, 0])
    batch = fill_batch(draw, num_groups=3, group_size=2, dynamic=True, max_draws=5)
    assert calls == [0, 1]                       # full after two draws
    assert batch.examples == ["d0g1", "d0g1", "d1g1", "d1g1", "d1g2", "d1g2"]
    assert batch.rewards == [0, 1, 1, 0, 0, 1]
    assert batch.stats["dynamic/draws"] == 2 and batch.stats["dynamic/topped_up"] == 0
    assert batch.stats["dynamic/kept_fraction"] == 3 / 6
    assert batch.stats["reward"] == 5 / 12 and batch.stats["reward/errors"] == 1


def test_dynamic_sampling_stops_at_its_draw_cap_and_tops_up_with_dropped_groups():
    draw, calls = draws([1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0])
    batch = fill_batch(draw, num_groups=2, group_size=2, dynamic=True, max_draws=2)
    assert calls == [0, 1]
    assert batch.examples == ["d0g1", "d0g1", "d0g0", "d0g0"]
    assert batch.stats["dynamic/topped_up"] == 1


def test_without_dynamic_sampling_the_first_draw_is_the_batch():
    draw, calls = draws([1, 1, 0, 0])
    batch = fill_batch(draw, num_groups=2, group_size=2, dynamic=False, max_draws=4)
    assert calls == [0] and batch.rewards == [1, 1, 0, 0]
    assert "dynamic/draws" not in batch.stats and batch.stats["accuracy"] == 0.5


def test_overlong_penalty_is_linear_over_the_buffer():
    lengths = torch.tensor([10, 12, 14, 16])
    assert overlong_penalty(lengths, 16, 4, 1.0).tolist() == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty(lengths, 16, 0, 1.0).tolist() == [0.0] * 4
