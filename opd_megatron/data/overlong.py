"""What to do with an example longer than `data.max_seq_length` (`data.overlong_prompt`).

One policy for every stage, applied when the training dataset is loaded, so an over-long row is
never silently cut from the right (SFT lost its response that way) or run past the limit (the RL
stages ignored it):

    skip           drop the example (counted: metric `overlong_skipped`)
    truncate_left  keep its last `max_seq_length` tokens (counted: metric `overlong_truncated`)
    error          stop with the row's file:line
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

from opd_megatron.data.dataset import DataError, Dataset

OverlongPolicy = Literal["skip", "truncate_left", "error"]


@dataclasses.dataclass(frozen=True)
class Screened:
    dataset: Dataset
    skipped: int = 0
    truncated: int = 0


def screen_overlong(dataset: Dataset, length: Callable[[object], int], limit: int,
                    policy: OverlongPolicy, *, what: str) -> Screened:
    """Apply `policy` to the examples whose `length` (tokens) exceeds `limit`; `what` names the
    measured sequence in errors ("prompt", "prompt + response")."""
    keep, locations, skipped, truncated = [], [], 0, 0
    for example, location in zip(dataset.examples, dataset.locations):
        n = length(example)
        if n > limit:
            if policy == "error":
                raise DataError(f"{location}: {what} is {n} tokens, longer than "
                                f"data.max_seq_length={limit} (data.overlong_prompt=error; "
                                "skip or truncate_left handle it)")
            if policy == "skip":
                skipped += 1
                continue
            truncated += 1
        keep.append(dataclasses.replace(example, index=len(keep)))
        locations.append(location)
    if not keep:
        raise DataError(f"{dataset.path}: every example is longer than data.max_seq_length={limit} "
                        "(data.overlong_prompt=skip)")
    screened = dataclasses.replace(dataset, examples=keep, locations=locations)
    return Screened(screened, skipped=skipped, truncated=truncated)


def keep_last(ids: list[int], limit: int) -> list[int]:
    """`truncate_left`: the last `limit` ids (a no-op for examples within the limit)."""
    return ids[-limit:] if len(ids) > limit else ids
