"""HF config.json <-> ModelArch for every supported family."""
import pytest
import transformers

from opd_megatron.models.arch import ArchitectureError, ModelArch, RopeScaling
from opd_megatron.models.builder import padded_vocab_size, rope_inv_freq

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256)


def hf_configs():
    return {
        "llama": transformers.LlamaConfig(**SMALL, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
            "original_max_position_embeddings": 64, "rope_theta": 50000.0}),
        "qwen2": transformers.Qwen2Config(**SMALL),
        "qwen3": transformers.Qwen3Config(**SMALL, head_dim=32, tie_word_embeddings=True),
        "mistral": transformers.MistralConfig(**SMALL, sliding_window=None),
    }


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_round_trip_through_hf_dict(family):
    cfg = hf_configs()[family]
    arch = ModelArch.from_hf_dict(cfg.to_dict())
    assert arch.model_type == family and arch.num_key_value_heads == 1
    assert ModelArch.from_hf_dict(arch.to_hf_dict()) == arch
    assert arch.qkv_bias == (family == "qwen2") and arch.qk_norm == (family == "qwen3")
    # transformers reads back the config we write.
    reloaded = transformers.AutoConfig.for_model(**arch.to_hf_dict())
    assert reloaded.num_key_value_heads == 1 and reloaded.hidden_size == 64


def test_llama3_scaling_and_inv_freq_match_transformers():
    cfg = hf_configs()["llama"]
    arch = ModelArch.from_hf_dict(cfg.to_dict())
    assert arch.rope_scaling == RopeScaling(4.0, 1.0, 2.0, 64) and arch.rope_theta == 50000.0
    rope = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    assert (rope.inv_freq - rope_inv_freq(arch)).abs().max() < 1e-7


def test_qwen3_head_dim_is_read():
    assert ModelArch.from_hf_dict(hf_configs()["qwen3"].to_dict()).head_dim == 32


def test_unsupported_architecture():
    with pytest.raises(ArchitectureError, match="model_type 'gpt2' is not supported"):
        ModelArch.from_hf_dict({"model_type": "gpt2"})


def test_missing_field_names_it():
    d = hf_configs()["qwen2"].to_dict()
    del d["intermediate_size"]
    with pytest.raises(ArchitectureError, match="missing field 'intermediate_size'"):
        ModelArch.from_hf_dict(d)


def test_heads_not_multiple_of_groups():
    d = {**hf_configs()["qwen2"].to_dict(), "num_key_value_heads": 3}
    with pytest.raises(ArchitectureError, match="not a multiple of num_key_value_heads=3"):
        ModelArch.from_hf_dict(d)


def test_vocab_padding_is_multiple_of_128_times_tp():
    assert padded_vocab_size(300, 1) == 384
    assert padded_vocab_size(300, 2) == 512
    assert padded_vocab_size(151936, 4) == 152064
