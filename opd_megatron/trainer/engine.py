"""A trainable Megatron model: DDP-wrapped chunks, the (distributed) optimizer and the LR schedule.

Forward-only models (teachers, frozen references) use `build_frozen` instead: no DDP, no
optimizer, no gradient buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opd_megatron.config.schema import OptimizerConfig, ParallelConfig, PrecisionConfig
from opd_megatron.models.arch import ModelArch
from opd_megatron.models.builder import build_model_chunks
from opd_megatron.runtime.distributed import current_device
from opd_megatron.trainer.schedule import LossFn, run_microbatches


@dataclass
class TrainableModel:
    chunks: list[torch.nn.Module]   # DDP-wrapped, one per virtual pipeline stage
    optimizer: object               # megatron.core.optimizer.MegatronOptimizer
    scheduler: object               # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler
    arch: ModelArch

    def train(self) -> None:
        for chunk in self.chunks:
            chunk.train()

    def eval(self) -> None:
        for chunk in self.chunks:
            chunk.eval()

    def train_step(self, microbatches: list[dict], loss_fn: LossFn) -> tuple[list[dict], dict]:
        """One optimizer step over `microbatches` (gradient accumulation through the schedule).

        Returns the per-micro-batch metrics (last pipeline stage only) and the step's
        `grad_norm`, `lr`, whether the update was applied, and `skipped_nonfinite` (1 when a
        non-finite loss or gradient norm on any rank made every rank skip the update).
        """
        self.train()
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        metrics = run_microbatches(self.chunks, microbatches, loss_fn, forward_only=False)
        lr = float(self.optimizer.param_groups[0]["lr"])
        skipped = {"lr": lr, "update_applied": False, "skipped_nonfinite": 1}
        if _any_rank_true(_nonfinite_metrics(metrics)):
            self.optimizer.zero_grad()
            return metrics, {**skipped, "grad_norm": float("nan")}
        applied, grad_norm = step_if_finite(self.optimizer)
        if grad_norm is not None and not math.isfinite(grad_norm):
            self.optimizer.zero_grad()
            return metrics, {**skipped, "grad_norm": grad_norm}
        if applied:
            self.scheduler.step(increment=1)
        return metrics, {"grad_norm": float(grad_norm or 0.0), "lr": lr,
                         "update_applied": bool(applied), "skipped_nonfinite": 0}

    def reload_main_params(self) -> None:
        """Copy the model's weights into the optimizer's fp32 main parameters.

        Needed after loading weights into the model from outside the optimizer (an initial
        checkpoint): in bf16 the main parameters are separate fp32 tensors that would otherwise
        keep the random initialisation and overwrite the loaded weights at the first step. Never
        after loading a training checkpoint, whose optimizer state carries the exact fp32 main
        parameters (their bf16 copies lose every sub-ulp update).
        """
        for sub in sub_optimizers(self.optimizer):
            sub.reload_model_params()


def sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def step_if_finite(optimizer) -> tuple[bool, float | None]:
    """megatron's `optimizer.step()`, except that a non-finite gradient norm applies nothing.

    Without a loss scaler (bf16 and fp32) megatron checks no gradient for inf/NaN, and
    `clip_grad_by_total_norm_fp32` leaves the gradients as they are when the norm is NaN, so
    Adam would write NaN into every weight. The norm is reduced over every rank that holds
    gradients, so all ranks take the same decision; it is computed once, as megatron does.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():     # a loss scaler found inf (fp16): megatron's own skip
        return False, None
    grad_norm = float(optimizer.get_grad_norm())
    if _any_rank_true(not math.isfinite(grad_norm)):
        return False, float("nan")
    for sub in sub_optimizers(optimizer):
        params = sub.get_parameters()
        if params and sub.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params, max_norm=sub.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return optimizer.step_with_ready_grads(), grad_norm


def _nonfinite_metrics(metrics: list[dict]) -> bool:
    return any(isinstance(v, torch.Tensor) and not torch.isfinite(v).all()
               for m in metrics for v in m.values())


def _any_rank_true(local: bool) -> bool:
    flag = torch.tensor([float(local)], device=current_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def build_trainable(arch: ModelArch, parallel: ParallelConfig, precision: PrecisionConfig,
                    optim: OptimizerConfig, total_steps: int,
                    make_vocab_size_divisible_by: int = 128,
                    recompute: str = "none") -> TrainableModel:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    chunks = build_model_chunks(arch, parallel, precision,
                                make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                recompute=recompute)
    config = chunks[0].config
    # Losses return (sum, num_tokens): Megatron divides by the global token count once the
    # gradients of all micro-batches and DP ranks are reduced, so every layout is a token-mean.
    config.calculate_per_token_loss = True
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                # Bucketing only the first chunk matches Megatron-LM's VPP setup.
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        MegatronOptimizerConfig(
            optimizer=optim.name,
            sgd_momentum=optim.sgd_momentum,
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=config.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=parallel.distributed_optimizer,
        ),
        wrapped,
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [chunk.no_sync for chunk in wrapped]
    if len(wrapped) == 1:
        config.no_sync_func = config.no_sync_func[0]
    decay_steps = max(total_steps, optim.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return TrainableModel(chunks=wrapped, optimizer=optimizer, scheduler=scheduler, arch=arch)


def build_frozen(arch: ModelArch, parallel: ParallelConfig, precision: PrecisionConfig,
                 make_vocab_size_divisible_by: int = 128) -> list[torch.nn.Module]:
    """Model chunks for forward passes only: gradients off, no optimizer state."""
    chunks = build_model_chunks(arch, parallel, precision,
                                make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    for chunk in chunks:
        chunk.eval()
        chunk.requires_grad_(False)
    return chunks
