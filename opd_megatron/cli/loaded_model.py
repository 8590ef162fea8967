"""A Megatron checkpoint loaded for inference at a given layout, shared by generate and eval."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

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


@contextlib.contextmanager
def loaded_model(args):
    """Validate the layout against the checkpoint, initialize, load; shut down on exit."""
    from opd_megatron.checkpoint.megatron_dist import load_model, read_arch
    from opd_megatron.config.validate import validate_layout
    from opd_megatron.data.tokenizer import load_tokenizer
    from opd_megatron.rollout.native import NativeRolloutEngine
    from opd_megatron.runtime import distributed as rd
    from opd_megatron.trainer.engine import build_frozen

    arch = read_arch(args.megatron_dir)
    parallel = ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp)
    validate_layout(parallel, arch, rd.world_size_from_env(), cuda=torch.cuda.is_available(),
                    where="--tp/--pp")
    tokenizer = load_tokenizer(args.megatron_dir)
    rd.initialize(parallel, args.seed)
    try:
        chunks = build_frozen(arch, parallel, PrecisionConfig())
        load_model(chunks, args.megatron_dir)
        engine = NativeRolloutEngine(chunks, arch, eos_token_ids=[tokenizer.eos_token_id],
                                     pad_token_id=tokenizer.pad_token_id)
        yield LoadedModel(arch=arch, chunks=chunks, tokenizer=tokenizer, engine=engine)
    finally:
        rd.shutdown()
