"""HF -> Megatron -> HF is bit-identical, keeps the config, and transformers loads the result."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from opd_megatron.models.arch import ModelArch
from tests.checkpoint.tiny_models import MODELS

NAMES = [m.name for m in MODELS]
CONFIG_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                 "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act", "dtype",
                 "sliding_window", "use_sliding_window", "attention_bias")


def load_all(hf_dir) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(Path(hf_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.mark.parametrize("name", NAMES)
def test_tensors_bit_identical(converted, name):
    before, after = load_all(converted[name]["hf"]), load_all(converted[name]["hf_out"])
    assert sorted(after) == sorted(before)
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype, key
        assert torch.equal(after[key], tensor), key


@pytest.mark.parametrize("name", ["llama3", "qwen2"])
def test_export_of_a_checkpoint_saved_at_tp2pp2_is_bit_identical(converted, resaved_exports, name):
    before, after = load_all(converted[name]["hf"]), load_all(resaved_exports[name])
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("name", NAMES)
def test_config_equivalent(converted, name):
    from transformers import AutoConfig

    src, out = converted[name]["hf"], converted[name]["hf_out"]
    assert ModelArch.from_hf_dir(out) == ModelArch.from_hf_dir(src)
    a, b = AutoConfig.from_pretrained(src), AutoConfig.from_pretrained(out)
    for field in CONFIG_FIELDS:
        if hasattr(a, field):
            assert getattr(b, field) == getattr(a, field), field
    # Qwen2 configs have no head_dim; the export spells out the one transformers derives.
    assert head_dim(b) == head_dim(a)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@pytest.mark.parametrize("name", NAMES)
def test_transformers_loads_export_without_missing_keys(converted, name):
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(converted[name]["hf_out"],
                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_sharded_exports_have_an_index(converted):
    out = Path(converted["llama3"]["hf_out"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in load_all(out).values())


@pytest.mark.parametrize("name", NAMES)
def test_megatron_vocab_padding_rows_are_zero(converted, name):
    assert converted[name]["padding_max"] == 0.0


def test_side_files_travel_both_ways(converted):
    for key in ("megatron", "hf_out"):
        out = Path(converted["llama3"][key])
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (out / f).read_bytes() == (Path(converted["llama3"]["hf"]) / f).read_bytes()
    # Without a source generation_config.json the export still writes one (from bos/eos).
    assert (Path(converted["qwen3"]["hf_out"]) / "generation_config.json").is_file()


def test_force_replaced_the_existing_output(converted):
    megatron = Path(converted["llama3"]["megatron"])
    assert not (megatron / "stale.txt").exists()
    assert (megatron / "opd_megatron.json").is_file()
    assert not list(megatron.parent.glob(".*partial*")) and not list(megatron.parent.glob(".*old*"))


def test_megatron_metadata_records_dtype(converted):
    meta = json.loads((Path(converted["mistral"]["megatron"]) / "opd_megatron.json").read_text())
    assert meta["dtype"] == "bfloat16"
