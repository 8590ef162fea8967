"""The recipe schema of `python -m opd_megatron train`: foundation sections plus stage sections.

One schema serves every stage; `stage:` selects which sections are read, and each stage checks
the ones it needs in `validate_stage_config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from opd_megatron.config.loader import ConfigError
from opd_megatron.config.schema import RunConfig


@dataclass
class TrainerSection:
    steps: int = 10
    micro_batch_size: int = 4
    # Sequences (SFT) or prompts (RLVR/OPD/OPSD) per optimizer step, across all DP ranks.
    global_batch_size: int = 8
    save_every: int = 0
    keep_last: int = 2
    resume: str = "auto"                  # auto | none | <checkpoint dir>
    tensorboard: bool = True
    wandb_project: str | None = None
    eval_every: int = 0
    max_nonfinite_steps: int = 3          # stop after this many non-finite losses in a row
    # Save and exit once the step count is a multiple of this (Megatron-LM's --exit-interval),
    # e.g. to fit a scheduler's time slot; `resume: auto` continues the schedule.
    exit_interval: int = 0


@dataclass
class DataSection:
    train_path: str | None = None
    eval_path: str | None = None
    skip_bad_rows: bool = False
    tokenizer: str | None = None          # defaults to the model's checkpoint directory
    max_seq_length: int = 512
    # SFT: pack several samples per max_seq_length row with a block-causal mask (local layer
    # spec only: Transformer Engine takes packed sequences through cu_seqlens, not a mask).
    packing: bool = False


@dataclass
class RolloutSection:
    engine: Literal["native", "vllm"] = "native"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    samples_per_prompt: int = 1
    # Teacher/student top-K ids reported by the engine, for `distill.support: given`.
    return_top_k: int = 0
    vllm_tensor_parallel: int = 1
    vllm_gpu_memory_utilization: float = 0.5


@dataclass
class GRPOSection:
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0
    normalize_std: bool = True
    reward: str = "exact_match"
    reward_on_error: Literal["raise", "zero"] = "raise"
    # Modules imported before the run; they register custom rewards with
    # opd_megatron.rewards.registry.register_reward.
    reward_plugins: list[str] = field(default_factory=list)


@dataclass
class PISection:
    mode: Literal["none", "system_prompt", "answer_only", "full_solution"] = "none"
    system_prompt: str | None = None
    template: str | None = None


@dataclass
class TeacherSection:
    # external: its own checkpoint (OPD); initial / live: the student itself (OPSD).
    source: Literal["external", "initial", "live"] = "external"
    megatron_dir: str | None = None
    temperature: float = 1.0
    pi: PISection = field(default_factory=PISection)


@dataclass
class DistillSection:
    loss: str = "topk_rkl_sg"
    top_k: int = 20
    support: Literal["student", "teacher", "given"] = "student"
    beta: float = 0.5
    temperature: float = 1.0
    # Weight of the GRPO task-reward term mixed into the distillation loss (0 disables).
    reward_weight: float = 0.0
    # The diagnostics (top-K overlap, entropy, teacher rank, ...) need the full vocabulary; they
    # are computed every this many steps. Between, `topk_*_norm` reads only the support.
    metrics_every: int = 1


@dataclass
class EvalSection:
    reward: str = "exact_match"
    reward_options: dict = field(default_factory=dict)   # e.g. {require_correct: false}
    max_new_tokens: int = 64
    num_examples: int = 64
    samples_per_prompt: int = 1
    temperature: float = 0.0


@dataclass
class StageConfig(RunConfig):
    stage: Literal["sft", "rlvr", "opd", "opsd"] = "sft"
    trainer: TrainerSection = field(default_factory=TrainerSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalSection = field(default_factory=EvalSection)


def validate_stage_config(cfg: StageConfig, dp_size: int, where: str, *,
                          check_files: bool = True) -> None:
    def fail(message: str):
        raise ConfigError(f"{where}: {message}")

    t = cfg.trainer
    if cfg.data.train_path is None:
        fail("data.train_path is required")
    for key in ("train_path", "eval_path"):
        path = getattr(cfg.data, key)
        if check_files and path is not None and not Path(path).is_file():
            fail(f"data.{key}={path}: file not found")
    if t.global_batch_size % dp_size:
        fail(f"trainer.global_batch_size={t.global_batch_size} is not divisible by the "
             f"data-parallel size {dp_size}")
    per_rank = t.global_batch_size // dp_size
    if cfg.stage in ("rlvr", "opd", "opsd"):
        per_rank *= cfg.rollout.samples_per_prompt
    if per_rank % t.micro_batch_size:
        fail(f"trainer.micro_batch_size={t.micro_batch_size} does not divide the per-rank batch "
             f"of {per_rank} sequences")
    if cfg.stage == "rlvr" and cfg.rollout.samples_per_prompt < 2:
        fail("rollout.samples_per_prompt must be >= 2 for GRPO (group-normalized advantages)")
    if cfg.stage in ("opd", "opsd"):
        from opd_megatron.losses import LOSSES

        if cfg.distill.loss not in LOSSES:
            fail(f"distill.loss={cfg.distill.loss!r} is not one of {', '.join(LOSSES)}")
        if cfg.distill.metrics_every < 1:
            fail(f"distill.metrics_every={cfg.distill.metrics_every} must be >= 1")
        if cfg.teacher.temperature != cfg.distill.temperature:
            fail(f"teacher.temperature={cfg.teacher.temperature} differs from "
                 f"distill.temperature={cfg.distill.temperature}: the teacher must be read at "
                 "the student's temperature")
        if cfg.distill.support == "given" and cfg.rollout.return_top_k < cfg.distill.top_k:
            fail(f"distill.support=given needs rollout.return_top_k >= distill.top_k="
                 f"{cfg.distill.top_k}")
    if cfg.stage == "opd":
        if cfg.teacher.source != "external" or cfg.teacher.megatron_dir is None:
            fail("stage opd needs teacher.source=external and teacher.megatron_dir")
    if cfg.stage == "opsd":
        if cfg.teacher.source == "external":
            fail("stage opsd needs teacher.source=initial or live (the student's own weights)")
        if cfg.teacher.pi.mode == "none":
            fail("stage opsd needs teacher.pi.mode (system_prompt, answer_only or full_solution)")
