"""Deterministic, resumable, data-parallel batches of dataset indices.

All ranks walk the same seeded stream: epoch e is a permutation of the dataset seeded by
(seed, e), epochs are concatenated, and each step takes the next `batch_size * dp_size` indices,
rank r keeping its contiguous slice. The position in that stream (epoch, offset) is the whole
state, so it resumes exactly, and it does not depend on dp_size: a resume may change it.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class BatchSampler:
    def __init__(self, num_examples: int, batch_size: int, *, seed: int, dp_rank: int = 0,
                 dp_size: int = 1, shuffle: bool = True):
        if num_examples <= 0 or batch_size <= 0:
            raise ValueError(f"BatchSampler: need num_examples > 0 and batch_size > 0, "
                             f"got {num_examples} and {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"BatchSampler: dp_rank {dp_rank} not in [0, {dp_size})")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.dp_rank, self.dp_size, self.shuffle = dp_rank, dp_size, shuffle
        self.epoch, self.offset = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def next_batch(self) -> list[int]:
        """This rank's `batch_size` indices for the next step. A global batch larger than what is
        left of the epoch continues into the next epoch's order."""
        taken = self._take(self.batch_size * self.dp_size)
        return taken[self.dp_rank * self.batch_size:(self.dp_rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_examples": self.num_examples, "shuffle": self.shuffle,
                "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_examples", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"BatchSampler: checkpoint has {key}={state[key]!r}, this run has "
                                 f"{getattr(self, key)!r}; resuming would replay different data")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def _take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            order = self._epoch_order()
            step = min(count - len(taken), self.num_examples - self.offset)
            taken.extend(order[self.offset:self.offset + step].tolist())
            self.offset += step
            if self.offset == self.num_examples:
                self.epoch, self.offset = self.epoch + 1, 0
        return taken

    def _epoch_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
                     if self.shuffle else np.arange(self.num_examples))
            self._order = (self.epoch, order)
        return self._order[1]
