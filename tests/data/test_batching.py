from __future__ import annotations

import pytest
import torch

from opd_megatron.data.packing import pack_sequences, segment_causal_mask
from opd_megatron.data.padding import pad_batch


def test_pad_right():
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert batch.tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert batch.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_pad_left_with_multiple():
    batch = pad_batch([[5, 6, 7], [8]], pad_id=9, side="left", pad_to_multiple_of=4)
    assert batch.tokens.tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert batch.mask.tolist() == [[False, True, True, True], [False, False, False, True]]
    assert batch.position_ids.tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
    assert batch.tokens.dtype == torch.long


def test_pad_errors():
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], pad_id=0)
    with pytest.raises(ValueError, match="side must be"):
        pad_batch([[1]], pad_id=0, side="middle")


SAMPLES = [([1, 2, 3, 4], [0, 0, 1, 1]), ([5, 6, 7], [1, 1, 1]), ([8, 9], [0, 1]), ([10, 11, 12], [0, 1, 1])]


def test_pack_first_fit():
    packed = pack_sequences(SAMPLES, seq_len=6, pad_id=0)
    # Row 0: samples 0 and 2 (4 + 2); row 1: samples 1 and 3 (3 + 3).
    assert packed.tokens.tolist() == [[1, 2, 3, 4, 8, 9], [5, 6, 7, 10, 11, 12]]
    assert packed.segment_ids.tolist() == [[1, 1, 1, 1, 2, 2], [1, 1, 1, 2, 2, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    # A segment's first token is never a target, even when its sample marked it.
    assert packed.loss_mask.tolist() == [[0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1]]


def test_pack_keeps_every_token_once_and_pads():
    packed = pack_sequences(SAMPLES, seq_len=8, pad_id=-1)
    real = packed.segment_ids != 0
    assert sorted(packed.tokens[real].tolist()) == list(range(1, 13))
    assert (packed.tokens[~real] == -1).all() and (packed.loss_mask[~real] == 0).all()


def test_segment_causal_mask_blocks_other_segments_and_padding():
    packed = pack_sequences([([1, 2], [0, 1]), ([3, 4, 5], [0, 1, 1])], seq_len=6, pad_id=0)
    allowed = segment_causal_mask(packed.segment_ids)[0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def test_pack_rejects_oversized_and_mismatched():
    with pytest.raises(ValueError, match="sample 1 has 5 tokens"):
        pack_sequences([([1], [0]), ([1] * 5, [0] * 5)], seq_len=4, pad_id=0)
    with pytest.raises(ValueError, match="sample 0 has 2 tokens and 1 mask"):
        pack_sequences([([1, 2], [0])], seq_len=4, pad_id=0)
