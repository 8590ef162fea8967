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


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file (and line or row)."""


def iter_rows(path: Path) -> Iterator[RawRow]:
    if not path.is_file():
        raise DataError(f"{path}: dataset file not found")
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".parquet":
        return _parquet_rows(path)
    raise DataError(f"{path}: unsupported dataset extension {path.suffix!r} (use .jsonl or .parquet)")


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    # Bytes, decoded per line: a line that is not UTF-8 is one bad row, not a failed file.
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield f"{path}:{lineno}", functools.partial(_decode_line, line)


def _decode_line(raw: bytes) -> dict[str, Any]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("<utf-8>", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError("<json>", f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise RowError("<json>", f"must be a JSON object, got {type(value).__name__}")
    return value


def _parquet_rows(path: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}: row {number}", functools.partial(dict, row)
