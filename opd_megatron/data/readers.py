"""Raw rows of a JSONL or Parquet file (chosen by extension), each with its location for errors.

Rows are yielded as (location, load) so that a row that cannot even be decoded (bad JSON) is one
error the dataset can report or skip, like any other bad row.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from opd_megatron.data.examples import RowError

RawRow = tuple[str, Callable[[], dict[str, Any]]]


def iter_rows(path: Path) -> Iterator[RawRow]:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    raise ValueError(f"{path}: unsupported dataset extension {path.suffix!r} (use .jsonl or .parquet)")


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield f"{path}:{lineno}", functools.partial(_decode_line, line)


def _decode_line(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError("<json>", f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise RowError("<json>", f"must be a JSON object, got {type(value).__name__}")
    return value


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}: row {number}", functools.partial(dict, row)
