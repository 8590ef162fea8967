"""Verify a training checkpoint's files before loading it, so that a truncated or missing file is
one error naming it (megatron-core and torch.load would stop with EOFError, a zip error or an
AssertionError naming nothing), and `trainer.resume: auto` can fall back to an older iteration.

Checked: trainer_state.json and opd_megatron.json parse; both distributed checkpoints (model/,
train_state/optimizer/) have megatron's metadata.json and common.pt and torch's .metadata, and
every byte range .metadata points into exists; the RNG files load. Bit flips inside a shard are
not detected (torch_dist stores no checksums).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from opd_megatron.checkpoint.megatron_dist import CheckpointError, read_metadata

DIST_DIRS = ("model", "train_state/optimizer")


def verify_training_checkpoint(ckpt: str | Path) -> dict:
    """The checkpoint's trainer state, or CheckpointError naming the first unreadable file."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: checkpoint directory not found")
    state = _json(ckpt / "trainer_state.json")
    read_metadata(ckpt)
    for sub in DIST_DIRS:
        _verify_dist_checkpoint(ckpt / sub)
    for rng in sorted((ckpt / "train_state").glob("rng_rank*.pt")):
        _torch_load(rng)
    return state


def _json(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def _torch_load(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        torch.load(path, weights_only=False, map_location="cpu")
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError, ...
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from None


def _verify_dist_checkpoint(directory: Path) -> None:
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: missing")
    _json(directory / "metadata.json")
    _torch_load(directory / "common.pt")
    meta_path = directory / ".metadata"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: missing")
    try:
        with meta_path.open("rb") as f:
            metadata = pickle.load(f)
        extents = [(info.relative_path, info.offset + info.length)
                   for info in metadata.storage_data.values()]
    except Exception as err:
        raise CheckpointError(f"{meta_path}: unreadable ({type(err).__name__}: {err})") from None
    needed: dict[str, int] = {}
    for name, end in extents:
        needed[name] = max(end, needed.get(name, 0))
    for name, end in sorted(needed.items()):
        shard = directory / name
        if not shard.is_file():
            raise CheckpointError(f"{shard}: missing")
        size = shard.stat().st_size
        if size < end:
            raise CheckpointError(f"{shard}: truncated ({size} bytes, the index needs {end})")
