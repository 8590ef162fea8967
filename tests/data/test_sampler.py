from __future__ import annotations

import itertools

import pytest

from opd_megatron.data.sampler import BatchSampler


def take(sampler, steps):
    return [sampler.next_batch() for _ in range(steps)]


def test_same_seed_same_order_and_epochs_are_permutations():
    a, b = BatchSampler(10, 5, seed=3), BatchSampler(10, 5, seed=3)
    batches = take(a, 4)
    assert batches == take(b, 4)
    assert sorted(batches[0] + batches[1]) == list(range(10))
    assert sorted(batches[2] + batches[3]) == list(range(10))
    assert batches[:2] != batches[2:]
    assert a.epoch == 2
    assert take(BatchSampler(10, 5, seed=4), 2) != batches[:2]


def test_no_shuffle_is_sequential_across_epochs():
    assert take(BatchSampler(5, 3, seed=0, shuffle=False), 3) == [[0, 1, 2], [3, 4, 0], [1, 2, 3]]


def test_resume_continues_exactly():
    full = take(BatchSampler(7, 3, seed=1), 6)
    first = BatchSampler(7, 3, seed=1)
    take(first, 2)
    resumed = BatchSampler(7, 3, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert take(resumed, 4) == full[2:]


def test_dp_shards_are_disjoint_and_cover_the_epoch():
    dp_size, per_rank = 3, 2
    ranks = [BatchSampler(12, per_rank, seed=5, dp_rank=r, dp_size=dp_size) for r in range(dp_size)]
    per_step = [[rank.next_batch() for rank in ranks] for _ in range(2)]
    seen = list(itertools.chain.from_iterable(itertools.chain.from_iterable(per_step)))
    assert sorted(seen) == list(range(12))
    single = take(BatchSampler(12, per_rank * dp_size, seed=5), 2)
    assert [sum(step, []) for step in per_step] == single


def test_resume_with_different_dp_size_keeps_stream_position():
    reference = take(BatchSampler(20, 4, seed=2), 3)
    before = BatchSampler(20, 2, seed=2, dp_rank=1, dp_size=2)
    take(before, 1)
    after = [BatchSampler(20, 1, seed=2, dp_rank=r, dp_size=4) for r in range(4)]
    for sampler in after:
        sampler.load_state_dict(before.state_dict())
    assert [s.next_batch()[0] for s in after] == reference[1]


def test_state_mismatch_and_bad_arguments():
    state = BatchSampler(10, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="checkpoint has seed=1, this run has 2"):
        BatchSampler(10, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples=10, this run has 11"):
        BatchSampler(11, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"dp_rank 2 not in \[0, 2\)"):
        BatchSampler(10, 2, seed=1, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="need num_examples > 0"):
        BatchSampler(0, 2, seed=1)
