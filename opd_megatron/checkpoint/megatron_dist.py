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


# Transformer Engine modules keep FP8 scaling state in `<module>._extra_state`; checkpoints written
# with the local layer spec (every CPU conversion) have none. Their absence is harmless: TE starts
# from fresh scales, as it does for a new model.
EXTRA_STATE_SUFFIX = "._extra_state"


def load_model(chunks: list[torch.nn.Module], ckpt_dir: str | Path) -> None:
    """Collective: loads DIR/model into this rank's chunks, whatever layout saved it.

    Only `*._extra_state` entries may be absent from the checkpoint; any other key the model has
    and the checkpoint lacks (or the reverse) is a CheckpointError naming the keys.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    model_dir = Path(ckpt_dir) / MODEL_SUBDIR
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no model weights in checkpoint {ckpt_dir}")
    sharded = model_sharded_state_dict(chunks)
    # RETURN_UNEXPECTED drops the model's keys the checkpoint lacks from the load and names them.
    loaded, _, absent = dist_checkpointing.load(sharded, str(model_dir),
                                                strict=StrictHandling.RETURN_UNEXPECTED)
    _check_only_extra_state(absent, model_dir, "the model has and the checkpoint lacks")
    for index, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)
        result = module.load_state_dict(loaded[f"model{index}"], strict=False)
        _check_only_extra_state(result.missing_keys, model_dir,
                                "the model has and the checkpoint lacks")
        if result.unexpected_keys:
            raise CheckpointError(f"{model_dir}: keys the checkpoint has and the model lacks: "
                                  f"{_listed(result.unexpected_keys)}")


def _check_only_extra_state(keys, model_dir: Path, what: str) -> None:
    other = sorted(k for k in keys if not k.endswith(EXTRA_STATE_SUFFIX))
    if other:
        raise CheckpointError(f"{model_dir}: keys {what}: {_listed(other)}")


def _listed(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
