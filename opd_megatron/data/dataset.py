"""Prompt and SFT datasets: a file's rows validated into typed examples, held in memory."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from opd_megatron.data.examples import (PromptExample, RowError, SFTExample, parse_prompt_row,
                                        parse_sft_row)
from opd_megatron.data.readers import DataError, iter_rows

logger = logging.getLogger(__name__)

T = TypeVar("T", PromptExample, SFTExample)


@dataclass(frozen=True)
class Dataset(Generic[T]):
    path: Path
    examples: list[T]
    num_skipped: int = 0
    # Where each example came from ("file:line" or "file: row N"), for errors found after loading.
    locations: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> T:
        return self.examples[index]


def load_prompt_dataset(path: str | Path, *, skip_bad_rows: bool = False) -> Dataset[PromptExample]:
    """Rows with `prompt` or `messages`, `answer`, optional `solution` and `system_prompt`."""
    return _load(Path(path), parse_prompt_row, skip_bad_rows)


def load_sft_dataset(path: str | Path, *, skip_bad_rows: bool = False) -> Dataset[SFTExample]:
    """Rows with `prompt` + `response`, or `messages` whose last turn is the assistant's."""
    return _load(Path(path), parse_sft_row, skip_bad_rows)


def _load(path: Path, parse: Callable[[dict[str, Any], int], T], skip_bad_rows: bool) -> Dataset[T]:
    examples: list[T] = []
    locations: list[str] = []
    skipped = 0
    for location, load in iter_rows(path):
        try:
            examples.append(parse(load(), len(examples)))
            locations.append(location)
        except RowError as e:
            if not skip_bad_rows:
                raise DataError(f"{location}: {e}") from None
            skipped += 1
    if not examples:
        suffix = f" ({skipped} bad rows skipped)" if skipped else ""
        raise DataError(f"{path}: dataset has no valid rows{suffix}")
    if skipped:
        logger.warning("%s: skipped %d bad rows of %d", path, skipped, skipped + len(examples))
    return Dataset(path=path, examples=examples, num_skipped=skipped, locations=locations)
