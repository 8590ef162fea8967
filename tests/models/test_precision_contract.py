"""GPU-only choices, decided without a GPU: which layer spec and FP8 recipe a config selects."""
import pytest
import torch

from opd_megatron.config.schema import PrecisionConfig
from opd_megatron.models.precision import DeviceCaps, PrecisionError, plan_precision

CPU = DeviceCaps(cuda=False)
H100 = DeviceCaps(cuda=True, compute_capability=(9, 0), transformer_engine=True)
A100 = DeviceCaps(cuda=True, compute_capability=(8, 0), transformer_engine=True)
L40 = DeviceCaps(cuda=True, compute_capability=(8, 9), transformer_engine=True)
GPU_NO_TE = DeviceCaps(cuda=True, compute_capability=(9, 0), transformer_engine=False)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_cpu_uses_local_spec_in_fp32_and_bf16(precision, dtype):
    plan = plan_precision(PrecisionConfig(precision=precision), CPU)
    assert (plan.layer_spec, plan.params_dtype, plan.fp8_recipe) == ("local", dtype, None)


def test_cpu_refuses_fp8():
    with pytest.raises(PrecisionError, match="precision.precision=fp8 needs a CUDA GPU"):
        plan_precision(PrecisionConfig(precision="fp8"), CPU)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise", "blockwise"])
def test_hopper_fp8_recipes_use_transformer_engine(recipe):
    plan = plan_precision(PrecisionConfig(precision="fp8", fp8_recipe=recipe, fp8_format="e4m3"), H100)
    assert plan.layer_spec == "transformer_engine"
    assert plan.params_dtype == torch.bfloat16
    assert (plan.fp8_recipe, plan.fp8_format) == (recipe, "e4m3")


def test_bf16_uses_te_when_present_and_local_otherwise():
    assert plan_precision(PrecisionConfig(precision="bf16"), H100).layer_spec == "transformer_engine"
    assert plan_precision(PrecisionConfig(precision="bf16"), GPU_NO_TE).layer_spec == "local"


def test_blockwise_is_hopper_only():
    with pytest.raises(PrecisionError, match="blockwise is a Hopper"):
        plan_precision(PrecisionConfig(precision="fp8", fp8_recipe="blockwise"), L40)
    assert plan_precision(PrecisionConfig(precision="fp8", fp8_recipe="delayed"), L40).fp8_recipe == "delayed"


def test_fp8_needs_ada_or_hopper_and_te():
    with pytest.raises(PrecisionError, match="compute capability >= 8.9"):
        plan_precision(PrecisionConfig(precision="fp8"), A100)
    with pytest.raises(PrecisionError, match="needs Transformer Engine"):
        plan_precision(PrecisionConfig(precision="fp8"), GPU_NO_TE)


def test_fp8_plan_reaches_megatron_transformer_config():
    """The plan's recipe and format land in megatron-core's TransformerConfig fields."""
    from opd_megatron.config.schema import ParallelConfig
    from opd_megatron.models.arch import ModelArch
    from opd_megatron.models.builder import transformer_config

    arch = ModelArch(model_type="qwen3", vocab_size=100, hidden_size=64, intermediate_size=128,
                     num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    plan = plan_precision(PrecisionConfig(precision="fp8", fp8_recipe="tensorwise"), H100)
    cfg = transformer_config(arch, ParallelConfig(), plan)
    assert (cfg.fp8, cfg.fp8_recipe, cfg.bf16, cfg.params_dtype) == ("hybrid", "tensorwise", True, torch.bfloat16)
    assert cfg.qk_layernorm and cfg.num_query_groups == 2 and cfg.kv_channels == 16
