"""Impossible parallel layouts fail before any process group, naming the key and the file."""
import pytest

from opd_megatron.config.loader import ConfigError
from opd_megatron.config.schema import ParallelConfig
from opd_megatron.config.schema import OptimizerConfig
from opd_megatron.config.validate import validate_layout, validate_optimizer
from opd_megatron.models.arch import ModelArch

ARCH = ModelArch(model_type="llama", vocab_size=500, hidden_size=96, intermediate_size=192,
                 num_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=16)


def check(world_size=8, cuda=False, **parallel):
    validate_layout(ParallelConfig(**parallel), ARCH, world_size, cuda=cuda, where="conf/x.yaml")


def test_valid_layouts_pass():
    check(tensor_parallel=2, pipeline_parallel=4)
    check(world_size=4, tensor_parallel=2, pipeline_parallel=2, virtual_pipeline_parallel=1)


def test_tp_must_divide_attention_heads():
    with pytest.raises(ConfigError, match=r"conf/x\.yaml: parallel\.tensor_parallel=4 does not divide the model's num_attention_heads=6"):
        check(tensor_parallel=4)


def test_tp_must_divide_query_groups():
    with pytest.raises(ConfigError, match=r"parallel\.tensor_parallel=3 does not divide the model's num_key_value_heads=2"):
        check(world_size=6, tensor_parallel=3)


def test_pp_larger_than_layers():
    with pytest.raises(ConfigError, match=r"parallel\.pipeline_parallel=8 is larger than the model's num_layers=4"):
        check(pipeline_parallel=8)


def test_world_size_not_divisible():
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel\.tensor_parallel=2 x parallel\.pipeline_parallel=2"):
        check(world_size=6, tensor_parallel=2, pipeline_parallel=2)


def test_virtual_pipeline_must_divide_layers():
    with pytest.raises(ConfigError, match=r"virtual_pipeline_parallel=3 x pipeline_parallel=2 does not divide"):
        check(pipeline_parallel=2, virtual_pipeline_parallel=3)


def test_sequence_parallel_is_gpu_only():
    with pytest.raises(ConfigError, match=r"sequence_parallel=true needs Transformer Engine or apex"):
        check(tensor_parallel=2, sequence_parallel=True)
    check(tensor_parallel=2, sequence_parallel=True, cuda=True)


def test_expert_parallel_on_dense_model():
    with pytest.raises(ConfigError, match=r"parallel\.expert_parallel=2: the llama architecture is dense"):
        check(expert_parallel=2)


def test_min_lr_above_lr():
    with pytest.raises(ConfigError, match=r"conf/x\.yaml: optimizer\.min_lr=0\.001 must be in \[0, optimizer\.lr=0\.0001\]"):
        validate_optimizer(OptimizerConfig(lr=1e-4, min_lr=1e-3), "conf/x.yaml")


def test_sgd_needs_the_plain_optimizer():
    sgd = OptimizerConfig(name="sgd", lr=0.03)
    with pytest.raises(ConfigError, match=r"conf/x\.yaml: optimizer\.name=sgd needs parallel\.distributed_optimizer=false"):
        validate_optimizer(sgd, "conf/x.yaml", distributed_optimizer=True)
    validate_optimizer(sgd, "conf/x.yaml", distributed_optimizer=False)
