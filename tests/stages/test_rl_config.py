"""The RL options are validated up front, naming the key; GRPO's LR schedule counts updates."""
import pytest

from opd_megatron.config.loader import ConfigError
from opd_megatron.stages.config import StageConfig, schedule_in_updates, validate_stage_config


def rlvr(**grpo):
    cfg = StageConfig(stage="rlvr")
    cfg.data.train_path = "train.jsonl"
    cfg.rollout.samples_per_prompt = 4
    cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size = 4, 4   # 16 seqs, 4 micro-batches
    for key, value in grpo.items():
        setattr(cfg.grpo, key, value)
    return cfg


@pytest.mark.parametrize("change, message", [
    ({"mini_batches": 3}, "grpo.mini_batches=3 does not divide the 4 micro-batches"),
    ({"epochs": 0}, "grpo.mini_batches and grpo.epochs must be >= 1"),
    ({"overlong_buffer": 64}, r"grpo.overlong_buffer=64 must be in \[0, rollout.max_new_tokens=64\)"),
    ({"reward_max_error_rate": 1.5}, "grpo.reward_max_error_rate=1.5 must be in"),
    ({"reward_timeout": 0}, "grpo.reward_timeout > 0"),
    ({"dynamic_sampling_max_draws": 0}, "grpo.dynamic_sampling_max_draws must be >= 1"),
])
def test_bad_rl_options_name_their_key(change, message):
    with pytest.raises(ConfigError, match=message):
        validate_stage_config(rlvr(**change), dp_size=1, where="x.yaml", check_files=False)


def test_tis_needs_a_sampled_token_estimator_in_distillation():
    cfg = StageConfig(stage="opsd")
    cfg.teacher.source, cfg.teacher.pi.mode = "initial", "system_prompt"
    cfg.data.train_path = "train.jsonl"
    cfg.trainer.global_batch_size = cfg.trainer.micro_batch_size = 4
    cfg.rollout.tis_cap = 2.0
    with pytest.raises(ConfigError, match="rollout.tis_cap applies to GRPO and "
                                          "distill.loss=sampled_pg, not distill.loss=topk_rkl_sg"):
        validate_stage_config(cfg, dp_size=1, where="x.yaml", check_files=False)
    cfg.distill.loss = "sampled_pg"
    validate_stage_config(cfg, dp_size=1, where="x.yaml", check_files=False)


def test_grpo_schedule_counts_optimizer_updates():
    cfg = rlvr(mini_batches=2, epochs=3)
    cfg.trainer.steps, cfg.optimizer.warmup_steps = 10, 5
    optim, total = schedule_in_updates(cfg)
    assert (optim.warmup_steps, total) == (30, 60) and cfg.optimizer.warmup_steps == 5
    cfg.stage = "sft"
    assert schedule_in_updates(cfg)[0].warmup_steps == 5
