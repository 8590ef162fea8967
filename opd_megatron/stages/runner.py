"""Start a stage: validate, initialize, build the student, resume or load, then run the loop."""
from __future__ import annotations

from opd_megatron.models.arch import ModelArch
from opd_megatron.stages.config import StageConfig, schedule_in_updates, validate_stage_config


def stage_class(name: str):
    if name == "sft":
        from opd_megatron.stages.sft import SFTStage
        return SFTStage
    if name == "rlvr":
        from opd_megatron.stages.rlvr import RLVRStage
        return RLVRStage
    from opd_megatron.stages.distill import DistillStage
    return DistillStage


def import_reward_plugins(modules: list[str], where: str) -> None:
    import importlib

    from opd_megatron.config.loader import ConfigError

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"{where}: grpo.reward_plugins: cannot import {name!r} ({err})") from None


def check_reward_names(cfg: StageConfig, where: str) -> None:
    from opd_megatron.config.loader import ConfigError
    from opd_megatron.rewards.registry import reward_names

    known = reward_names()
    for key, name in (("grpo.reward", cfg.grpo.reward), ("eval.reward", cfg.eval.reward)):
        if name not in known:
            raise ConfigError(f"{where}: {key}={name!r} is not a registered reward "
                              f"(known: {', '.join(sorted(known))})")


def data_parallel_size(cfg: StageConfig, world_size: int) -> int:
    p = cfg.parallel
    return world_size // (p.tensor_parallel * p.pipeline_parallel * p.context_parallel)


def run_stage(cfg: StageConfig, arch: ModelArch, where: str) -> dict:
    from opd_megatron.runtime.distributed import world_size_from_env

    validate_stage_config(cfg, data_parallel_size(cfg, world_size_from_env()), where)
    import_reward_plugins(cfg.grpo.reward_plugins, where)
    check_reward_names(cfg, where)
    from megatron.core import parallel_state as ps

    from opd_megatron.runtime import distributed as rd
    from opd_megatron.runtime.child_processes import bind_checkpoint_writer_to_rank
    from opd_megatron.stages.context import StageContext, stage_tokenizer
    from opd_megatron.stages.loop import run_loop
    from opd_megatron.stages.resume import apply_schedule_overrides, plan_resume, run_fingerprint
    from opd_megatron.trainer.checkpointing import load_checkpoint, load_initial_weights
    from opd_megatron.trainer.engine import build_trainable

    resume = plan_resume(cfg, arch, where)
    rd.initialize(cfg.parallel, cfg.seed)
    try:
        bind_checkpoint_writer_to_rank()
        tokenizer, tokenizer_dir = stage_tokenizer(cfg)
        optim, total_updates = schedule_in_updates(cfg)
        model = build_trainable(arch, cfg.parallel, cfg.precision, optim, total_updates,
                                cfg.model.make_vocab_size_divisible_by,
                                recompute=cfg.trainer.recompute)
        ctx = StageContext(cfg=cfg, arch=arch, model=model, tokenizer=tokenizer,
                           tokenizer_dir=str(tokenizer_dir), dp_rank=ps.get_data_parallel_rank(),
                           dp_size=ps.get_data_parallel_world_size())
        if cfg.model.megatron_dir:
            load_initial_weights(model, cfg.model.megatron_dir)
        # The stage is built from the initial weights (OPSD's frozen teacher copies them).
        stage = stage_class(cfg.stage)(ctx)
        start = 0
        if resume is not None:
            # The config's schedule wins where trainer.resume_overrides says so.
            model.scheduler.override_opt_param_scheduler = resume.override_schedule
            state = load_checkpoint(resume.path, model)
            if resume.override_schedule:
                apply_schedule_overrides(model)
            stage.load_state_dict(state["stage"])
            start = state["iteration"]
        result = run_loop(cfg, stage, model, start_step=start, tokenizer_dir=str(tokenizer_dir),
                          run_record=run_fingerprint(cfg, arch))
        result["final_eval"] = stage.evaluate() if cfg.data.eval_path and not result[
            "preempted"] else {}
        return result
    finally:
        rd.shutdown()
