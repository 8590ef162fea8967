"""Megatron distributed checkpoints (megatron-core `dist_checkpointing`, torch_dist format).

A checkpoint directory is self-describing:

    DIR/opd_megatron.json   format version, the model architecture, iteration
    DIR/config.json         the HF config of the architecture (what the HF export writes)
    DIR/<tokenizer files>   copied from the source HF checkpoint
    DIR/model/              the sharded weights; loads at any TP/PP/VPP layout
    DIR/train_state/        optimizer, scheduler, RNG and data position (training checkpoints)

Checkpoint keys are global (layer offsets, vocab shards), so a checkpoint saved at one layout
loads at another.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from opd_megatron.models.arch import ModelArch

FORMAT = "opd-megatron/1"
METADATA_FILE = "opd_megatron.json"
MODEL_SUBDIR = "model"


class CheckpointError(RuntimeError):
    pass


class ConversionError(CheckpointError):
    """Input that cannot be converted between HF and Megatron; the message names the file,
    tensor or flag at fault."""


def model_sharded_state_dict(chunks: list[torch.nn.Module]) -> dict:
    state = {}
    for index, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)   # unwrap Megatron DDP
        state[f"model{index}"] = module.sharded_state_dict()
    return state


def write_metadata(ckpt_dir: str | Path, arch: ModelArch, iteration: int = 0, **extra) -> None:
    ckpt_dir = Path(ckpt_dir)
    meta = {"format": FORMAT, "arch": arch.to_dict(), "iteration": iteration, **extra}
    (ckpt_dir / METADATA_FILE).write_text(json.dumps(meta, indent=2))
    (ckpt_dir / "config.json").write_text(json.dumps(arch.to_hf_dict(), indent=2))


def read_metadata(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / METADATA_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {ckpt_dir} is not an opd-megatron checkpoint")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_arch(ckpt_dir: str | Path) -> ModelArch:
    return ModelArch.from_dict(read_metadata(ckpt_dir)["arch"])


def save_model(chunks: list[torch.nn.Module], ckpt_dir: str | Path, *,
               sharded_strategy=None) -> None:
    """Collective: every rank calls it; each writes its own shards under DIR/model.

    `sharded_strategy` defaults to megatron-core's (forked, fsynced torch_dist writers: what a
    training run wants); one-shot conversions pass torch_dist_io.InProcessTorchDistSave().
    """
    from megatron.core import dist_checkpointing

    model_dir = Path(ckpt_dir) / MODEL_SUBDIR
    if torch.distributed.get_rank() == 0:
        model_dir.mkdir(parents=True, exist_ok=False)
    torch.distributed.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(model_dir),
                            sharded_strategy=sharded_strategy)


def load_full_tensors(ckpt_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of DIR/model as a full (TP=1) tensor, whatever layout saved it, without
    building a model or a process group; the embedding first, then layer by layer in model order
    under dist-checkpoint names with the layer index put back
    (decoder.layers.3.self_attention.linear_qkv.layer_norm_weight: the TE-spec name of the input
    norm, which both layer specs save under), then the rest. Holds about one layer at a time.
    """
    from opd_megatron.checkpoint.torch_dist_io import iter_full_tensors

    model_dir = Path(ckpt_dir) / MODEL_SUBDIR
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no model weights in checkpoint {ckpt_dir}")
    return iter_full_tensors(model_dir)


def load_model(chunks: list[torch.nn.Module], ckpt_dir: str | Path, strict: bool = True) -> None:
    """Collective: loads DIR/model into this rank's chunks, whatever layout saved it."""
    from megatron.core import dist_checkpointing

    model_dir = Path(ckpt_dir) / MODEL_SUBDIR
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no model weights in checkpoint {ckpt_dir}")
    sharded = model_sharded_state_dict(chunks)
    loaded = dist_checkpointing.load(sharded, str(model_dir))
    for index, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)
        module.load_state_dict(loaded[f"model{index}"], strict=strict)
