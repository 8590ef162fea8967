"""A run directory's history across restarts: metrics.jsonl and history.json are continued, never
replaced, and hold each step once.

A run resumed from iteration N replays the steps after N that an earlier attempt had already
logged (it crashed or was stopped after its last checkpoint). Those rows are superseded: they move
to metrics.replayed.jsonl (kept, not lost) and the replayed steps are logged afresh.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

METRICS = "metrics.jsonl"
REPLAYED = "metrics.replayed.jsonl"
HISTORY = "history.json"


def continue_history(out_dir: str | Path, start_step: int) -> list[dict]:
    """Rank 0, before the metrics file is opened: the rows of steps <= `start_step` (the
    history a run resumed at `start_step` continues; none for a fresh start), with later rows
    moved to metrics.replayed.jsonl."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]
    keep = [i for i, row in enumerate(rows) if start_step > 0 and row.get("step", 0) <= start_step]
    kept = set(keep)
    superseded = [line for i, line in enumerate(lines) if i not in kept]
    if superseded:
        with (Path(out_dir) / REPLAYED).open("a") as f:
            f.write("".join(line + "\n" for line in superseded))
            f.flush()
            os.fsync(f.fileno())
        _write_atomically(path, "".join(lines[i] + "\n" for i in keep))
    return [rows[i] for i in keep]


def write_history(out_dir: str | Path, history: list[dict]) -> None:
    _write_atomically(Path(out_dir) / HISTORY, json.dumps(history, indent=1))


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
