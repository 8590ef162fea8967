"""The one trainer loop every stage runs: resume, step, log, evaluate, checkpoint."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Protocol

import torch

from opd_megatron.stages.config import StageConfig


class NonFiniteLossError(RuntimeError):
    pass


class Stage(Protocol):
    def step(self, step: int) -> dict[str, float]:
        """One optimizer step; returns this rank's metrics (may be empty off the last PP stage)."""

    def evaluate(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean of each metric over the ranks that reported it (last PP stage, one per DP replica)."""
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, metrics)
    keys = sorted({k for m in gathered if m for k in m})
    out = {}
    for key in keys:
        values = [float(m[key]) for m in gathered if m and key in m]
        out[key] = sum(values) / len(values)
    return out


def is_metrics_reporter() -> bool:
    """One rank per DP replica reports micro-batch metrics: the last PP stage's TP rank 0."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0


def run_loop(cfg: StageConfig, stage: Stage, model, *, start_step: int,
             tokenizer_dir: str | None, run_record: dict | None = None) -> dict:
    """`run_record` is saved with every checkpoint (what a resume is checked against)."""
    from opd_megatron.trainer.checkpointing import save_checkpoint
    from opd_megatron.trainer.history import continue_history, write_history
    from opd_megatron.trainer.metrics import MetricsLogger

    rank0 = torch.distributed.get_rank() == 0
    out_dir = Path(cfg.output_dir)
    t = cfg.trainer
    earlier = continue_history(out_dir, start_step) if rank0 else []
    logger = MetricsLogger(out_dir, total_steps=t.steps, start_step=start_step, enabled=rank0,
                           tensorboard=t.tensorboard, wandb_project=t.wandb_project,
                           run_name=cfg.stage, bar_keys=("loss", "reward", "accuracy", "lr"))
    nonfinite_in_a_row = 0
    history: list[dict] = []
    try:
        if t.eval_every and start_step == 0:
            initial = {f"eval/{k}": v for k, v in stage.evaluate().items()}
            logger.log(0, initial)
            history.append({"step": 0, **initial})
        for step in range(start_step, t.steps):
            begin = time.time()
            metrics = reduce_metrics(stage.step(step))
            metrics["step_seconds"] = time.time() - begin
            loss = metrics.get("loss", 0.0)
            if not math.isfinite(loss) or metrics.get("skipped_nonfinite", 0) > 0:
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= t.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_a_row} non-finite losses in a row (step {step + 1}); "
                        "stopping (trainer.max_nonfinite_steps)")
            else:
                nonfinite_in_a_row = 0
            if t.eval_every and (step + 1) % t.eval_every == 0:
                metrics.update({f"eval/{k}": v for k, v in stage.evaluate().items()})
            logger.log(step + 1, metrics)
            history.append({"step": step + 1, **metrics})
            exiting = bool(t.exit_interval) and (step + 1) % t.exit_interval == 0
            last = step + 1 == t.steps or exiting
            if (t.save_every and (step + 1) % t.save_every == 0) or (last and t.save_every >= 0):
                save_checkpoint(out_dir / "checkpoints", step + 1, model, stage.state_dict(),
                                keep_last=t.keep_last, tokenizer_dir=tokenizer_dir,
                                run_record=run_record)
            if exiting:
                break
    finally:
        logger.close()
    if rank0:
        write_history(out_dir, earlier + history)
    return {"history": history}
