"""Every recipe in conf/ loads into its schema and fits the layout its name promises."""
from pathlib import Path

import pytest

from opd_megatron.cli.smoke import SmokeConfig
from opd_megatron.config.loader import load_config
from opd_megatron.config.validate import validate_layout
from opd_megatron.models.arch import ModelArch
from opd_megatron.stages.config import StageConfig, validate_stage_config

CONF = Path(__file__).resolve().parents[2] / "conf"
RECIPES = sorted(p for p in CONF.glob("*.yaml"))

# Published configs of the models the GPU recipes name (checked here without downloading them).
QWEN3_1P7B = ModelArch(model_type="qwen3", vocab_size=151936, hidden_size=2048,
                       intermediate_size=6144, num_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                       max_position_embeddings=40960, tie_word_embeddings=True)
QWEN3_8B = ModelArch(model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                     max_position_embeddings=40960, tie_word_embeddings=False)
TINY = ModelArch(model_type="qwen3", vocab_size=110, hidden_size=64, intermediate_size=128,
                 num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def test_every_recipe_is_listed():
    assert len(RECIPES) >= 10


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads_and_fits_its_layout(recipe):
    if recipe.name.startswith("smoke"):
        cfg = load_config(recipe, SmokeConfig)
        assert cfg.model.hf_config is not None
        return
    cfg = load_config(recipe, StageConfig)
    if recipe.name.startswith("base_"):
        return
    qwen = "qwen3" in recipe.name
    world = 8 if qwen else 1
    student = QWEN3_1P7B if qwen else TINY
    p = cfg.parallel
    dp = world // (p.tensor_parallel * p.pipeline_parallel)
    assert f"tp{p.tensor_parallel}" in recipe.name
    if qwen:
        assert f"dp{dp}" in recipe.name
        assert cfg.precision.precision == "fp8" and cfg.rollout.engine == "vllm"
    validate_layout(p, student, world, cuda=qwen, where=str(recipe))
    if cfg.stage == "opd" and "8b" in recipe.name:
        validate_layout(p, QWEN3_8B, world, cuda=True, where=str(recipe))
    validate_stage_config(cfg, dp, str(recipe), check_files=False)


def test_paper_settings_in_gpu_recipes():
    opd = load_config(CONF / "opd_qwen3_1p7b_from_qwen3_1p7b_grpo_tp1_dp8.yaml", StageConfig)
    assert (opd.optimizer.lr, opd.optimizer.adam_beta1, opd.optimizer.adam_beta2) == (2e-6, 0.9, 0.98)
    assert (opd.trainer.global_batch_size, opd.rollout.samples_per_prompt) == (64, 1)
    assert (opd.rollout.temperature, opd.rollout.top_p, opd.rollout.max_new_tokens) == (1.0, 0.95, 4096)
    assert (opd.distill.loss, opd.distill.top_k) == ("topk_rkl_sg", 20)
    grpo = load_config(CONF / "rlvr_qwen3_1p7b_teacher_tp1_dp8.yaml", StageConfig)
    assert (grpo.trainer.global_batch_size, grpo.rollout.samples_per_prompt) == (16, 8)
    assert (grpo.optimizer.lr, grpo.grpo.clip_low, grpo.grpo.clip_high, grpo.grpo.kl_coef) == (1e-6, 0.2, 0.28, 0.0)
    assert grpo.data.max_seq_length == 8192
    bf16 = load_config(CONF / "opd_qwen3_1p7b_from_qwen3_8b_tp2_dp4.yaml", StageConfig,
                       ["precision.precision=bf16"])
    assert bf16.precision.precision == "bf16" and bf16.parallel.tensor_parallel == 2
