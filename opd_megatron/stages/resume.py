"""The rules of a run directory: which checkpoint a stage resumes from, and when it refuses to.

    trainer.resume: auto   the newest complete, readable iteration under OUTPUT_DIR/checkpoints
                           (an unreadable newer one is reported and skipped); none there: step 0
    trainer.resume: none   start fresh; refused if OUTPUT_DIR/checkpoints already holds a run
    trainer.resume: DIR    that checkpoint, verified first

A resumed run must be the same run: the checkpoint records the keys below, and one that differs
is refused with its name, unless `trainer.resume_overrides` lists it (then the config wins; the
layout and model cannot be overridden: the optimizer state reshards across DP ranks only). A run
that already reached `trainer.steps` is refused rather than "resumed" into a no-op. Unfinished
saves (`.tmp_iter_*`) are removed first.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from opd_megatron.checkpoint.megatron_dist import CheckpointError
from opd_megatron.config.loader import ConfigError
from opd_megatron.models.arch import ModelArch
from opd_megatron.stages.config import StageConfig
from opd_megatron.trainer.checkpoint_files import verify_training_checkpoint
from opd_megatron.trainer.checkpointing import complete_checkpoints

_TMP_ITER = re.compile(r"^\.tmp_iter_\d{7}$")

# Keys whose change the config may win over the checkpoint (trainer.resume_overrides).
SCHEDULE_KEYS = ("optimizer.lr", "optimizer.min_lr", "optimizer.warmup_steps",
                 "optimizer.lr_decay_style", "optimizer.weight_decay", "trainer.steps")
OVERRIDABLE = (*SCHEDULE_KEYS, "data.train_path")
# Keys that must match: another stage, model or model-parallel layout is another run.
FIXED = ("stage", "model", "parallel.tensor_parallel", "parallel.pipeline_parallel",
         "parallel.virtual_pipeline_parallel")


def run_fingerprint(cfg: StageConfig, arch: ModelArch) -> dict:
    """What a checkpoint records about the run that wrote it (trainer_state.json `run`)."""
    def get(key: str):
        section, _, name = key.partition(".")
        return getattr(getattr(cfg, section), name)

    train = Path(cfg.data.train_path)
    values = {key: get(key) for key in SCHEDULE_KEYS + FIXED[2:]}
    return {"stage": cfg.stage, "model": arch.to_dict(), **values,
            "data.train_path": {"path": str(train.resolve()), "bytes": train.stat().st_size}}


@dataclass(frozen=True)
class ResumePoint:
    path: Path
    iteration: int
    # The config wins over the checkpoint's learning-rate schedule (an override lists one).
    override_schedule: bool


def validate_resume_overrides(cfg: StageConfig, where: str) -> None:
    for key in cfg.trainer.resume_overrides:
        if key not in OVERRIDABLE:
            raise ConfigError(f"{where}: trainer.resume_overrides: {key!r} cannot be overridden "
                              f"(one of: {', '.join(OVERRIDABLE)})")


def remove_unfinished_saves(root: Path) -> None:
    """Rank 0, before any save: `.tmp_iter_*` are saves a crash interrupted (never complete)."""
    if root.is_dir():
        for path in root.iterdir():
            if _TMP_ITER.match(path.name):
                shutil.rmtree(path)


def _newest_readable(root: Path) -> tuple[Path, dict] | None:
    for path in complete_checkpoints(root):
        try:
            return path, verify_training_checkpoint(path)
        except CheckpointError as err:
            # Resuming from an older iteration repeats steps: say so, once, on rank 0.
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"warning: resume: skipping {path.name}: {err}", file=sys.stderr, flush=True)
    return None


def _check_same_run(recorded: dict, current: dict, overrides: list[str], ckpt: Path) -> None:
    for key in (*FIXED, *OVERRIDABLE):
        if key not in recorded or recorded[key] == current[key] or key in overrides:
            continue
        was, now = recorded[key], current[key]
        if key == "model":
            changed = sorted(k for k in now if was.get(k) != now.get(k))
            was = {k: was.get(k) for k in changed}
            now = {k: now.get(k) for k in changed}
        hint = ("list it in trainer.resume_overrides to let the config win, or use a new "
                "output_dir" if key in OVERRIDABLE else "use a new output_dir")
        raise CheckpointError(f"{ckpt}: {key} was {was} in the checkpoint, {now} now; {hint}")


def plan_resume(cfg: StageConfig, arch: ModelArch, where: str) -> ResumePoint | None:
    """Where this stage starts from (None: step 0), or one error naming the key or file.

    Filesystem only, before any process group: every rank reaches the same answer."""
    validate_resume_overrides(cfg, where)
    root = Path(cfg.output_dir) / "checkpoints"
    if int(os.environ.get("RANK", "0")) == 0:
        remove_unfinished_saves(root)
    t = cfg.trainer
    if t.resume == "none":
        done = complete_checkpoints(root)
        if done:
            raise ConfigError(f"{where}: trainer.resume=none but {root} already holds {done[0].name}; "
                              "use a new output_dir (or trainer.resume=auto to continue that run)")
        return None
    if t.resume == "auto":
        found = _newest_readable(root)
        if found is None:
            if complete_checkpoints(root):
                raise CheckpointError(f"{root}: no readable checkpoint to resume (see the "
                                      "warnings above); move them away or use a new output_dir")
            return None
        path, state = found
    else:
        path = Path(t.resume)
        state = verify_training_checkpoint(path)
    # As the checkpoint holds it: through JSON (tuples become lists).
    current = json.loads(json.dumps(run_fingerprint(cfg, arch)))
    _check_same_run(state.get("run", {}), current, t.resume_overrides, path)
    iteration = int(state["iteration"])
    if iteration >= t.steps:
        raise CheckpointError(
            f"{path}: the run already finished (iteration {iteration}, trainer.steps={t.steps}); "
            "use a new output_dir, or raise trainer.steps and list it in "
            "trainer.resume_overrides to train on")
    return ResumePoint(path=path, iteration=iteration,
                       override_schedule=any(k in t.resume_overrides for k in SCHEDULE_KEYS))


def apply_schedule_overrides(model) -> None:
    """After loading a checkpoint with `override_schedule`: megatron's scheduler took the
    config's values, but the optimizer's param groups still carry the checkpoint's max_lr/min_lr
    (the scheduler reads those first); give them the config's and recompute the lr."""
    scheduler = model.scheduler
    for group in model.optimizer.param_groups:
        group["max_lr"], group["min_lr"] = scheduler.max_lr, scheduler.min_lr
    scheduler.step(increment=0)
