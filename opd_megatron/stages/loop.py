"""The one trainer loop every stage runs: resume, step, log, evaluate, checkpoint."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Protocol

import torch

from opd_megatron.stages.config import StageConfig
from opd_megatron.stages.timing import TIMER, phase


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


def trained_tokens_per_second(metrics: dict[str, float]) -> float:
    """Loss tokens of the whole step (every data-parallel replica) per wall second."""
    from megatron.core import parallel_state as ps

    seconds = metrics["step_seconds"]
    replicas = ps.get_data_parallel_world_size()
    return metrics.get("tokens", 0.0) * replicas / seconds if seconds > 0 else 0.0


def run_loop(cfg: StageConfig, stage: Stage, model, *, start_step: int,
             tokenizer_dir: str | None, run_record: dict | None = None) -> dict:
    """Returns the `history` of logged metrics and `preempted`: the signal that stopped the run
    early (its checkpoint written), or None. `run_record` is saved with every checkpoint (what a
    resume is checked against)."""
    from opd_megatron.trainer.history import continue_history, write_history
    from opd_megatron.trainer.metrics import MetricsLogger
    from opd_megatron.trainer.preemption import PreemptionWatch

    rank0 = torch.distributed.get_rank() == 0
    out_dir = Path(cfg.output_dir)
    t = cfg.trainer
    earlier = continue_history(out_dir, start_step) if rank0 else []
    logger = MetricsLogger(out_dir, total_steps=t.steps, start_step=start_step, enabled=rank0,
                           tensorboard=t.tensorboard, wandb_project=t.wandb_project,
                           run_name=cfg.stage, bar_keys=("loss", "reward", "accuracy", "lr"))
    nonfinite_in_a_row = 0
    history: list[dict] = []
    preempted = None
    try:
        with PreemptionWatch(t.preempt_signals) as watch:
            if t.eval_every and start_step == 0:
                with phase("eval"):
                    initial = {f"eval/{k}": v for k, v in stage.evaluate().items()}
                initial["time/eval"] = TIMER.take()["time/eval"]
                logger.log(0, initial)
                history.append({"step": 0, **initial})
            for step in range(start_step, t.steps):
                begin = time.time()
                metrics = reduce_metrics(stage.step(step))
                metrics["step_seconds"] = time.time() - begin
                metrics["tokens_per_second"] = trained_tokens_per_second(metrics)
                skipped = not math.isfinite(metrics.get("loss", 0.0)) or \
                    metrics.get("skipped_nonfinite", 0) > 0
                nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped else 0
                if nonfinite_in_a_row >= t.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_a_row} steps in a row with a non-finite loss or gradient "
                        f"(step {step + 1}); stopping (trainer.max_nonfinite_steps)")
                preempted = watch.agreed()
                if t.eval_every and (step + 1) % t.eval_every == 0 and not preempted:
                    with phase("eval"):
                        metrics.update({f"eval/{k}": v for k, v in stage.evaluate().items()})
                exiting = bool(preempted) or (
                    bool(t.exit_interval) and (step + 1) % t.exit_interval == 0)
                with phase("checkpoint"):
                    saved = _save_if_due(cfg, stage, model, step + 1, skipped=skipped,
                                         last=exiting or step + 1 == t.steps,
                                         tokenizer_dir=tokenizer_dir, run_record=run_record)
                # Logged after the save, so that the row carries this step's checkpoint time.
                metrics.update(reduce_metrics(TIMER.take()))
                logger.log(step + 1, metrics)
                history.append({"step": step + 1, **metrics})
                if preempted and rank0:
                    where = saved or _newest_checkpoint(out_dir)
                    print(f"preempted by {preempted} after step {step + 1}: "
                          + (f"checkpoint at {where}; trainer.resume=auto continues from it"
                             if where else "no checkpoint (trainer.save_every < 0)"), flush=True)
                if exiting:
                    break
    finally:
        logger.close()
    if rank0:
        write_history(out_dir, earlier + history)
    return {"history": history, "preempted": preempted}


def _save_if_due(cfg: StageConfig, stage: Stage, model, iteration: int, *, skipped: bool,
                 last: bool, tokenizer_dir: str | None, run_record: dict | None) -> Path | None:
    """Checkpoint on schedule (`trainer.save_every`) and at the last step (unless save_every < 0),
    never right after a skipped step: its weights may be the non-finite ones that caused it, and
    `latest` must always be safe for `resume: auto`."""
    from opd_megatron.trainer.checkpointing import save_checkpoint

    t = cfg.trainer
    due = (t.save_every > 0 and iteration % t.save_every == 0) or (last and t.save_every >= 0)
    if not due:
        return None
    if skipped:
        if torch.distributed.get_rank() == 0:
            print(f"step {iteration} was skipped (non-finite loss or gradient): no checkpoint "
                  "written for it", flush=True)
        return None
    return save_checkpoint(Path(cfg.output_dir) / "checkpoints", iteration, model,
                           stage.state_dict(), keep_last=t.keep_last, tokenizer_dir=tokenizer_dir,
                           run_record=run_record)


def _newest_checkpoint(out_dir: Path) -> Path | None:
    from opd_megatron.trainer.checkpointing import latest_checkpoint

    return latest_checkpoint(out_dir / "checkpoints")
