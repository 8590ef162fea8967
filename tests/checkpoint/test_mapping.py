"""The parameter mapping on its own: Megatron's fused layouts, padding, order and its errors."""
import pytest
import torch

from opd_megatron.checkpoint.mapping import (
    MappingError,
    canonical_megatron_name,
    hf_to_megatron_tensors,
    mapping_for,
    megatron_to_hf_tensors,
)
from tests.checkpoint.hf_fixtures import hf_state, tiny_arch

ARCHS = {
    "llama": tiny_arch("llama"),
    "llama_tied_mqa": tiny_arch("llama", num_key_value_heads=1, tie_word_embeddings=True),
    "mistral": tiny_arch("mistral", head_dim=8),
    "qwen2": tiny_arch("qwen2", tie_word_embeddings=True),
    "qwen3": tiny_arch("qwen3", head_dim=8),
}


def to_megatron(arch, state):
    return dict(hf_to_megatron_tensors(arch, state.items()))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_qkv_is_fused_group_by_group(groups):
    arch = tiny_arch("qwen2", num_key_value_heads=groups)
    state = hf_state(arch)
    mg = to_megatron(arch, state)
    d, per_group = arch.head_dim, arch.num_attention_heads // groups
    for kind in ("weight", "bias"):
        q, k, v = (state[f"model.layers.1.self_attn.{p}_proj.{kind}"] for p in "qkv")
        expected = torch.cat([torch.cat([q[g * per_group * d:(g + 1) * per_group * d],
                                         k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]])
                              for g in range(groups)])
        assert torch.equal(mg[f"decoder.layers.1.self_attention.linear_qkv.{kind}"], expected)


def test_fc1_is_gate_then_up_and_norms_map():
    arch = ARCHS["llama"]
    state = hf_state(arch)
    mg = to_megatron(arch, state)
    fc1 = mg["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(fc1, torch.cat([state["model.layers.0.mlp.gate_proj.weight"],
                                       state["model.layers.0.mlp.up_proj.weight"]]))
    assert torch.equal(mg["decoder.layers.0.pre_mlp_layernorm.weight"],
                       state["model.layers.0.post_attention_layernorm.weight"])
    assert torch.equal(mg["decoder.final_layernorm.weight"], state["model.norm.weight"])


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_vocabulary_rows_are_padded_with_zeros(name):
    arch = ARCHS[name]
    mg = to_megatron(arch, hf_state(arch))
    vocab_tensors = [k for k in mg if k in ("embedding.word_embeddings.weight",
                                            "output_layer.weight")]
    assert vocab_tensors == (["embedding.word_embeddings.weight"] if arch.tie_word_embeddings
                             else ["embedding.word_embeddings.weight", "output_layer.weight"])
    for key in vocab_tensors:
        assert mg[key].shape == (384, arch.hidden_size)  # 300 padded to a multiple of 128
        assert mg[key][300:].abs().max() == 0


def test_qk_norm_only_for_qwen3():
    for name, arch in ARCHS.items():
        shapes = mapping_for(arch).megatron_shapes
        qk = [k for k in shapes if ".q_layernorm." in k or ".k_layernorm." in k]
        assert len(qk) == (2 * arch.num_layers if name == "qwen3" else 0), name
        assert all(shapes[k] == (arch.head_dim,) for k in qk)


@pytest.mark.parametrize("name", list(ARCHS))
def test_round_trip_in_hf_order(name):
    arch = ARCHS[name]
    state = hf_state(arch)
    mg = to_megatron(arch, state)
    back = list(megatron_to_hf_tensors(arch, mg.items()))
    assert [k for k, _ in back] == list(state)  # HF order, what transformers' modules define
    for key, tensor in back:
        assert torch.equal(tensor, state[key]), key


def test_megatron_order_does_not_matter_and_te_names_are_accepted():
    arch = ARCHS["qwen3"]
    state = hf_state(arch)
    mg = to_megatron(arch, state)
    te = {}
    for key, tensor in reversed(list(mg.items())):
        key = key.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        key = key.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        te[f"module.{key}"] = tensor
    te["module.decoder.layers.0.mlp.linear_fc1._extra_state"] = None
    back = dict(megatron_to_hf_tensors(arch, te.items()))
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_canonical_names():
    assert canonical_megatron_name("module.decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == \
        "decoder.layers.3.pre_mlp_layernorm.weight"
    assert canonical_megatron_name("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight") \
        == "decoder.layers.0.input_layernorm.weight"
    assert canonical_megatron_name("decoder.layers.0.self_attention.linear_qkv.weight") == \
        "decoder.layers.0.self_attention.linear_qkv.weight"


def test_tied_checkpoints_may_carry_lm_head_and_inv_freq():
    arch = ARCHS["qwen2"]
    state = hf_state(arch)
    extra = {**state, "lm_head.weight": state["model.embed_tokens.weight"],
             "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2)}
    assert to_megatron(arch, extra).keys() == to_megatron(arch, state).keys()


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"),
     "HF tensor 'model.layers.1.mlp.up_proj.weight' is missing"),
    (lambda s: s.update({"model.layers.0.mlp.gate_proj.bias": torch.zeros(24)}),
     "unexpected HF tensor 'model.layers.0.mlp.gate_proj.bias'"),
    (lambda s: s.update({"model.norm.weight": torch.zeros(17)}),
     "tensor 'model.norm.weight' has shape [17], the architecture needs [16]"),
])
def test_hf_side_errors(mutate, message):
    arch = ARCHS["llama"]
    state = hf_state(arch)
    mutate(state)
    with pytest.raises(MappingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        to_megatron(arch, state)


def test_megatron_side_errors():
    arch = ARCHS["llama"]
    mg = to_megatron(arch, hf_state(arch))
    missing = {k: v for k, v in mg.items() if k != "decoder.layers.1.mlp.linear_fc2.weight"}
    with pytest.raises(MappingError, match="'decoder.layers.1.mlp.linear_fc2.weight' is missing"):
        list(megatron_to_hf_tensors(arch, missing.items()))
    with pytest.raises(MappingError, match="unexpected Megatron tensor 'decoder.layers.2"):
        list(megatron_to_hf_tensors(arch, [*mg.items(), ("decoder.layers.2.mlp.linear_fc2.weight",
                                                          torch.zeros(16, 24))]))
    with pytest.raises(MappingError, match=r"has shape \[16, 23\], expected \[16, 24\]"):
        list(megatron_to_hf_tensors(arch, [("decoder.layers.0.mlp.linear_fc2.weight",
                                            torch.zeros(16, 23))]))
    with pytest.raises(MappingError, match="given twice"):
        list(megatron_to_hf_tensors(arch, [*mg.items(), *mg.items()]))
