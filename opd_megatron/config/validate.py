"""Cross-field checks that must fail before any process group starts."""
from __future__ import annotations

from opd_megatron.config.loader import ConfigError
from opd_megatron.config.schema import OptimizerConfig, ParallelConfig, PrecisionConfig
from opd_megatron.data.shapes import check_context_parallel
from opd_megatron.models.arch import ModelArch


def validate_layout(parallel: ParallelConfig, arch: ModelArch, world_size: int, *, cuda: bool,
                    where: str = "<config>") -> None:
    """Raise ConfigError (one line: file, key, values) if `parallel` cannot run `arch`."""
    tp, pp, cp = parallel.tensor_parallel, parallel.pipeline_parallel, parallel.context_parallel

    def fail(message: str):
        raise ConfigError(f"{where}: {message}")

    for key, value in (("tensor_parallel", tp), ("pipeline_parallel", pp),
                       ("context_parallel", cp), ("expert_parallel", parallel.expert_parallel)):
        if value < 1:
            fail(f"parallel.{key}={value} must be >= 1")
    if arch.num_attention_heads % tp:
        fail(f"parallel.tensor_parallel={tp} does not divide the model's "
             f"num_attention_heads={arch.num_attention_heads}")
    if arch.num_key_value_heads % tp:
        fail(f"parallel.tensor_parallel={tp} does not divide the model's "
             f"num_key_value_heads={arch.num_key_value_heads} (query groups)")
    if arch.intermediate_size % tp:
        fail(f"parallel.tensor_parallel={tp} does not divide the model's "
             f"intermediate_size={arch.intermediate_size}")
    if pp > arch.num_layers:
        fail(f"parallel.pipeline_parallel={pp} is larger than the model's "
             f"num_layers={arch.num_layers}")
    vpp = parallel.virtual_pipeline_parallel
    if vpp is not None:
        if pp < 2:
            fail(f"parallel.virtual_pipeline_parallel={vpp} needs parallel.pipeline_parallel >= 2")
        if arch.num_layers % (pp * vpp):
            fail(f"parallel.virtual_pipeline_parallel={vpp} x pipeline_parallel={pp} does not "
                 f"divide the model's num_layers={arch.num_layers}")
    if world_size % (tp * pp * cp):
        fail(f"world size {world_size} is not divisible by parallel.tensor_parallel={tp} x "
             f"parallel.pipeline_parallel={pp} x parallel.context_parallel={cp}")
    if parallel.expert_parallel != 1:
        fail(f"parallel.expert_parallel={parallel.expert_parallel}: the {arch.model_type} "
             "architecture is dense (no experts)")
    check_context_parallel(parallel, where)
    if parallel.sequence_parallel and tp == 1:
        fail("parallel.sequence_parallel=true needs parallel.tensor_parallel > 1")
    if not cuda:
        if parallel.sequence_parallel:
            fail("parallel.sequence_parallel=true needs Transformer Engine or apex norms (GPU only)")


def validate_optimizer(optim: OptimizerConfig, where: str = "<config>", *,
                       distributed_optimizer: bool = False) -> None:
    if optim.name != "adam" and distributed_optimizer:
        # Megatron's DistributedOptimizer shards Adam's state only.
        raise ConfigError(f"{where}: optimizer.name={optim.name} needs "
                          "parallel.distributed_optimizer=false")
    if optim.lr <= 0:
        raise ConfigError(f"{where}: optimizer.lr={optim.lr} must be positive")
    if not 0 <= optim.min_lr <= optim.lr:
        raise ConfigError(f"{where}: optimizer.min_lr={optim.min_lr} must be in [0, optimizer.lr="
                          f"{optim.lr}]")
    if optim.warmup_steps < 0 or optim.clip_grad < 0 or optim.weight_decay < 0:
        raise ConfigError(f"{where}: optimizer.warmup_steps, clip_grad and weight_decay must be >= 0")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(optim, key) < 1:
            raise ConfigError(f"{where}: optimizer.{key}={getattr(optim, key)} must be in [0, 1)")


def validate_precision(precision: PrecisionConfig, where: str = "<config>") -> None:
    """What megatron-core would refuse only once the model is built."""
    if precision.fp8_first_last_layers_bf16:
        if precision.precision != "fp8":
            raise ConfigError(f"{where}: precision.fp8_first_last_layers_bf16=true needs "
                              f"precision.precision=fp8 (got {precision.precision})")
        if precision.fp8_recipe == "delayed":
            raise ConfigError(f"{where}: precision.fp8_first_last_layers_bf16=true does not work "
                              "with precision.fp8_recipe=delayed (megatron-core refuses it); use "
                              "tensorwise or blockwise")
