"""A Megatron checkpoint loaded for inference at a given layout: score, generate and eval."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from opd_megatron.config.schema import ParallelConfig, PrecisionConfig
from opd_megatron.models.arch import ModelArch


@dataclass
class LoadedModel:
    arch: ModelArch
    chunks: list[torch.nn.Module]
    tokenizer: object
    engine: object           # NativeRolloutEngine


def add_layout_arguments(parser) -> None:
    parser.add_argument("--megatron-dir", required=True, help="Megatron checkpoint directory")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--seed", type=int, default=1234)


def checked_arch(megatron_dir) -> ModelArch:
    """The checkpoint's architecture, or one line naming --megatron-dir and the file at fault."""
    from opd_megatron.checkpoint.megatron_dist import CheckpointError, read_arch
    from opd_megatron.config.loader import ConfigError

    try:
        return read_arch(megatron_dir)
    except (CheckpointError, ValueError) as err:
        raise ConfigError(f"--megatron-dir: {err}") from None


@contextlib.contextmanager
def megatron_for_checkpoint(megatron_dir, tp: int, pp: int, seed: int,
                            where: str) -> Iterator[ParallelConfig]:
    """Validate a TP x PP layout against the checkpoint's architecture before any process group
    exists (errors name `where`), initialize Megatron at it, and shut it down on exit."""
    from opd_megatron.checkpoint.megatron_dist import read_arch
    from opd_megatron.config.validate import validate_layout
    from opd_megatron.runtime import distributed as rd

    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    validate_layout(parallel, read_arch(megatron_dir), rd.world_size_from_env(),
                    cuda=torch.cuda.is_available(), where=where)
    rd.initialize(parallel, seed)
    try:
        yield parallel
    finally:
        rd.shutdown()


def load_frozen(megatron_dir, parallel: ParallelConfig) -> tuple[ModelArch, list[torch.nn.Module]]:
    """The checkpoint's model at `parallel` (Megatron initialised), fp32, frozen, loaded."""
    from opd_megatron.checkpoint.megatron_dist import load_model, read_arch
    from opd_megatron.trainer.engine import build_frozen

    arch = read_arch(megatron_dir)
    chunks = build_frozen(arch, parallel, PrecisionConfig())
    load_model(chunks, megatron_dir)
    return arch, chunks


@contextlib.contextmanager
def loaded_model(args) -> Iterator[LoadedModel]:
    """The checkpoint of `args` (add_layout_arguments) loaded with its tokenizer and a rollout
    engine; Megatron is shut down on exit."""
    from opd_megatron.data.tokenizer import load_tokenizer
    from opd_megatron.rollout.native import NativeRolloutEngine

    checked_arch(args.megatron_dir)
    tokenizer = load_tokenizer(args.megatron_dir)
    with megatron_for_checkpoint(args.megatron_dir, args.tp, args.pp, args.seed,
                                 where="--tp/--pp") as parallel:
        arch, chunks = load_frozen(args.megatron_dir, parallel)
        engine = NativeRolloutEngine(chunks, arch, eos_token_ids=[tokenizer.eos_token_id],
                                     pad_token_id=tokenizer.pad_token_id)
        yield LoadedModel(arch=arch, chunks=chunks, tokenizer=tokenizer, engine=engine)
