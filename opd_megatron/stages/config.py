"""The recipe schema of `python -m opd_megatron train`: foundation sections plus stage sections.

One schema serves every stage; `stage:` selects which sections are read, and each stage checks
the ones it needs in `validate_stage_config`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from opd_megatron.config.loader import ConfigError
from opd_megatron.config.schema import OptimizerConfig, RunConfig
from opd_megatron.config.validate import validate_precision


@dataclass
class TrainerSection:
    steps: int = 10
    micro_batch_size: int = 4
    # Sequences (SFT) or prompts (RLVR/OPD/OPSD) per optimizer step, across all DP ranks.
    global_batch_size: int = 8
    save_every: int = 0
    keep_last: int = 2
    resume: str = "auto"                  # auto | none | <checkpoint dir>
    # Keys whose new value wins over a resumed checkpoint's (opd_megatron/stages/resume.py).
    resume_overrides: list[str] = field(default_factory=list)
    tensorboard: bool = True
    wandb_project: str | None = None
    eval_every: int = 0
    # Stop after this many steps in a row whose loss or gradient norm was not finite (each one
    # is skipped on every rank: no update, no checkpoint).
    max_nonfinite_steps: int = 3
    # Signals that make every rank finish its step, checkpoint and exit 0 (SLURM's --signal
    # sends SIGUSR1 when asked to; schedulers and `kill` send SIGTERM).
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    # Save and exit once the step count is a multiple of this (Megatron-LM's --exit-interval),
    # e.g. to fit a scheduler's time slot; `resume: auto` continues the schedule.
    exit_interval: int = 0
    # Activation recompute (megatron-core's): none, selective (core attention) or full (every
    # layer's input is kept and the layer recomputed in backward); trades compute for memory.
    recompute: Literal["none", "selective", "full"] = "none"


@dataclass
class DataSection:
    train_path: str | None = None
    eval_path: str | None = None
    skip_bad_rows: bool = False
    tokenizer: str | None = None          # defaults to the model's checkpoint directory
    # Extra variables of the tokenizer's chat template for every prompt, student's and teacher's
    # alike, e.g. {enable_thinking: false} for Qwen3's non-thinking mode.
    chat_template_kwargs: dict = field(default_factory=dict)
    max_seq_length: int = 512
    # Rows longer than max_seq_length (the prompt in RL stages, prompt + response in SFT):
    # skip | truncate_left | error (opd_megatron/data/overlong.py).
    overlong_prompt: Literal["skip", "truncate_left", "error"] = "error"
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
    # Truncated importance sampling against the engine/trainer log-prob mismatch: each token's
    # policy gradient weighted by min(pi_trainer / pi_engine, tis_cap) (GRPO and the sampled_pg
    # distillation loss); 0 disables.
    tis_cap: float = 0.0
    # vLLM only: every N steps the step's rollouts are scored again by the student, forward-only
    # in eval mode, and `refit/gen_kl_error` logged (a stale or mis-mapped refit shows there
    # apart from any training-mode noise); 0 never. Every step's `gen_kl_error` comes from the
    # training forward itself (stages/offpolicy.py).
    verify_every: int = 0


@dataclass
class GRPOSection:
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0
    normalize_std: bool = True
    # PPO-style updates per rollout batch: the batch's micro-batches split into `mini_batches`
    # optimizer steps, the whole pass repeated `epochs` times; the clip acts from the second.
    mini_batches: int = 1
    epochs: int = 1
    # DAPO dynamic sampling: drop prompt groups whose rewards are all equal (no advantage) and
    # draw more prompts until the batch is full, at most `dynamic_sampling_max_draws` draws
    # (then the batch is topped up with dropped groups, which carry no gradient).
    dynamic_sampling: bool = False
    dynamic_sampling_max_draws: int = 4
    # DAPO overlong handling: `overlong_filter` masks the loss of truncated responses;
    # `overlong_buffer` > 0 subtracts overlong_penalty * (excess / buffer) from the reward of
    # responses longer than rollout.max_new_tokens - overlong_buffer.
    overlong_filter: bool = False
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    reward: str = "exact_match"
    # A reward that raises or times out scores 0 and is counted (reward/errors); the run stops
    # once more than reward_max_error_rate of the responses so far failed (raise: at the first).
    reward_on_error: Literal["raise", "zero"] = "zero"
    reward_max_error_rate: float = 0.05
    # Rewards run in this many worker processes, each call cut off after reward_timeout seconds
    # (math-verify can hang); 0 scores in the trainer process without a timeout.
    reward_workers: int = 2
    reward_timeout: float = 10.0
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

    from opd_megatron.trainer.preemption import signal_number

    t = cfg.trainer
    validate_precision(cfg.precision, where)
    for name in t.preempt_signals:
        try:
            signal_number(name)
        except ValueError as err:
            fail(f"trainer.preempt_signals: {err}")
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
    if cfg.rollout.verify_every < 0:
        fail(f"rollout.verify_every={cfg.rollout.verify_every} must be >= 0 (0: never)")
    if cfg.stage == "rlvr" and cfg.rollout.samples_per_prompt < 2:
        fail("rollout.samples_per_prompt must be >= 2 for GRPO (group-normalized advantages)")
    validate_rl_options(cfg, per_rank // t.micro_batch_size, fail)
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
        if cfg.rollout.temperature != cfg.distill.temperature:
            mismatch = (f"rollout.temperature={cfg.rollout.temperature} differs from "
                        f"distill.temperature={cfg.distill.temperature}")
            if cfg.distill.loss == "sampled_pg":
                fail(f"{mismatch}: sampled_pg's estimator is on-policy only for responses sampled "
                     "at the temperature the loss reads the student at")
            if os.environ.get("RANK", "0") == "0":
                print(f"warning: {where}: {mismatch}: responses are sampled from another "
                      "distribution than the one the loss matches to the teacher",
                      file=sys.stderr, flush=True)
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


def validate_rl_options(cfg: StageConfig, microbatches_per_rank: int, fail) -> None:
    g, r = cfg.grpo, cfg.rollout
    if g.mini_batches < 1 or g.epochs < 1:
        fail("grpo.mini_batches and grpo.epochs must be >= 1")
    if microbatches_per_rank % g.mini_batches:
        fail(f"grpo.mini_batches={g.mini_batches} does not divide the {microbatches_per_rank} "
             "micro-batches of a rank's rollout batch")
    if r.tis_cap < 0:
        fail(f"rollout.tis_cap={r.tis_cap} must be >= 0 (0 disables)")
    if r.tis_cap and cfg.stage in ("opd", "opsd") and cfg.distill.loss != "sampled_pg":
        fail(f"rollout.tis_cap applies to GRPO and distill.loss=sampled_pg, not "
             f"distill.loss={cfg.distill.loss}")
    if g.dynamic_sampling_max_draws < 1:
        fail("grpo.dynamic_sampling_max_draws must be >= 1")
    if not 0 <= g.overlong_buffer < r.max_new_tokens:
        fail(f"grpo.overlong_buffer={g.overlong_buffer} must be in [0, rollout.max_new_tokens="
             f"{r.max_new_tokens})")
    if not 0 <= g.reward_max_error_rate <= 1:
        fail(f"grpo.reward_max_error_rate={g.reward_max_error_rate} must be in [0, 1]")
    if g.reward_workers < 0 or g.reward_timeout <= 0:
        fail("grpo.reward_workers must be >= 0 and grpo.reward_timeout > 0")


def schedule_in_updates(cfg: StageConfig) -> tuple[OptimizerConfig, int]:
    """The optimizer section and total count in optimizer updates: GRPO makes
    mini_batches x epochs updates per step, and the LR schedule (counted by Megatron per
    update) keeps its warmup and decay in steps."""
    updates = cfg.grpo.mini_batches * cfg.grpo.epochs if cfg.stage == "rlvr" else 1
    optim = replace(cfg.optimizer, warmup_steps=cfg.optimizer.warmup_steps * updates)
    return optim, cfg.trainer.steps * updates
