"""Typed configuration sections shared by every stage.

A recipe (conf/*.yaml) is loaded into `RunConfig`; stage-specific sections live next to the stage
that reads them and are registered in `RunConfig` as plain dataclass fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int | None = None
    context_parallel: int = 1
    expert_parallel: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    # On gloo batched p2p gives wrong gradients with virtual pipeline stages (docs/DESIGN.md);
    # `None` picks False on CPU and True on GPU.
    batch_p2p_comm: bool | None = None


@dataclass
class PrecisionConfig:
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] = "delayed"
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    # Keep the first/last transformer layers in bf16 under FP8 (a common stability choice).
    fp8_first_last_layers_bf16: bool = False


@dataclass
class ModelConfig:
    """Where the model comes from: a converted Megatron checkpoint, an HF dir, or an HF config."""

    megatron_dir: str | None = None
    hf_dir: str | None = None
    hf_config: dict | None = None
    # Multiple of (128 x TP) the embedding is padded to, as Megatron-LM does.
    make_vocab_size_divisible_by: int = 128
    seed: int = 1234


@dataclass
class OptimizerConfig:
    # sgd (momentum sgd_momentum) exists to separate a loss's gradient from Adam's normalisation
    # of it (tools/ablate.py's tail-leak arms); recipes train with adam.
    name: Literal["adam", "sgd"] = "adam"
    sgd_momentum: float = 0.9
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class RunConfig:
    """The foundation sections; stages extend this with their own (see opd_megatron.stages)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 1234
    output_dir: str = "runs/default"
