"""`trainer.recompute` and `precision.fp8_first_last_layers_bf16` reach megatron-core's
TransformerConfig (which validates them), for every recipe in conf/; bad combinations are one
line before any model exists."""
import re
from pathlib import Path

import pytest
import yaml

from opd_megatron.config.loader import ConfigError, load_config
from opd_megatron.config.schema import ParallelConfig, PrecisionConfig
from opd_megatron.config.validate import validate_precision
from opd_megatron.models.builder import transformer_config
from opd_megatron.models.precision import DeviceCaps, plan_precision
from opd_megatron.stages.config import StageConfig
from tests.config.test_recipes import QWEN3_1P7B

CONF = Path(__file__).resolve().parents[2] / "conf"
STAGE_RECIPES = sorted(p for p in CONF.glob("*.yaml") if not p.name.startswith("smoke"))
H100 = DeviceCaps(cuda=True, compute_capability=(9, 0), transformer_engine=True)


def recipe_chain(path: Path) -> list[dict]:
    """The recipe's YAML and that of its defaults, innermost last."""
    raw = yaml.safe_load(path.read_text())
    chain = [c for d in raw.get("defaults", []) for c in recipe_chain(path.parent / d)]
    return chain + [raw]


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda p: p.name)
def test_every_recipe_sets_recompute_and_megatron_takes_it(recipe):
    assert any("recompute" in raw.get("trainer", {}) for raw in recipe_chain(recipe)), \
        f"{recipe.name}: no trainer.recompute in the recipe or its defaults"
    cfg = load_config(recipe, StageConfig)
    plan = plan_precision(cfg.precision if "qwen3" in recipe.name else PrecisionConfig(), H100)
    config = transformer_config(QWEN3_1P7B, cfg.parallel, plan, recompute=cfg.trainer.recompute)
    expected = {"none": (None, None, None), "selective": ("selective", None, None),
                "full": ("full", "uniform", 1)}[cfg.trainer.recompute]
    assert (config.recompute_granularity, config.recompute_method,
            config.recompute_num_layers) == expected


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_recompute_options_are_megatrons(recompute):
    plan = plan_precision(PrecisionConfig(precision="bf16"), H100)
    config = transformer_config(QWEN3_1P7B, ParallelConfig(), plan, recompute=recompute)
    if recompute == "selective":
        assert config.recompute_modules == ["core_attn"]     # megatron's default module list
    assert config.recompute_granularity == (None if recompute == "none" else recompute)


def test_fp8_first_last_layers_bf16_reaches_megatron():
    precision = PrecisionConfig(precision="fp8", fp8_recipe="tensorwise",
                                fp8_first_last_layers_bf16=True)
    config = transformer_config(QWEN3_1P7B, ParallelConfig(), plan_precision(precision, H100),
                                fp8_first_last_layers_bf16=precision.fp8_first_last_layers_bf16)
    assert config.first_last_layers_bf16 is True
    assert (config.num_layers_at_start_in_bf16, config.num_layers_at_end_in_bf16) == (1, 1)
    off = transformer_config(QWEN3_1P7B, ParallelConfig(), plan_precision(precision, H100))
    assert off.first_last_layers_bf16 is False


@pytest.mark.parametrize("precision, message", [
    (PrecisionConfig(precision="bf16", fp8_first_last_layers_bf16=True),
     "precision.fp8_first_last_layers_bf16=true needs precision.precision=fp8 (got bf16)"),
    (PrecisionConfig(precision="fp8", fp8_recipe="delayed", fp8_first_last_layers_bf16=True),
     "precision.fp8_first_last_layers_bf16=true does not work with precision.fp8_recipe=delayed"),
])
def test_fp8_first_last_layers_bf16_is_validated_against_the_recipe(precision, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        validate_precision(precision, "conf/x.yaml")
    assert str(err.value).startswith("conf/x.yaml: ") and "\n" not in str(err.value)
    # The delayed-recipe case is what megatron-core itself would refuse, once the model is built.
    if precision.precision == "fp8":
        with pytest.raises(ValueError, match="Delayed scaling does not support"):
            transformer_config(QWEN3_1P7B, ParallelConfig(), plan_precision(precision, H100),
                               fp8_first_last_layers_bf16=True)


def test_recipe_validation_checks_precision():
    from opd_megatron.stages.config import validate_stage_config

    cfg = load_config(CONF / "sft_qwen3_1p7b_tp1_dp8.yaml", StageConfig,
                      ["precision.fp8_recipe=delayed", "precision.fp8_first_last_layers_bf16=true"])
    with pytest.raises(ConfigError, match="fp8_recipe=delayed"):
        validate_stage_config(cfg, 8, "conf/sft_qwen3_1p7b_tp1_dp8.yaml", check_files=False)
