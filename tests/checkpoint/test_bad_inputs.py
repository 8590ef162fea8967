"""Bad conversion inputs: each is one line naming the file, tensor or flag, and leaves nothing
behind. They are all caught before a Megatron model (or process group) exists, so these tests
run in the pytest process; the command-line tests check the `error: ...` line and exit code 2."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from opd_megatron.checkpoint.convert import (
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    staged_output,
)
from opd_megatron.checkpoint.megatron_dist import CheckpointError, ConversionError, write_metadata
from tests.checkpoint.hf_fixtures import hf_state, tiny_arch, write_hf
from tests.launch import REPO_ROOT

ARCH = tiny_arch("llama")


def assert_fails(tmp_path, hf_dir, message, *, out_exists=False):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=message) as err:
        convert_hf_to_megatron(hf_dir, out, progress=False)
    assert "\n" not in str(err.value)
    assert out.exists() == out_exists
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left


def test_unsupported_architecture(tmp_path):
    hf = write_hf(tmp_path / "hf", ARCH, config={"model_type": "gpt2"})
    assert_fails(tmp_path, hf, "config.json: model_type 'gpt2' is not supported")


@pytest.mark.parametrize("config, message", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"mlp_bias": True}, "mlp_bias=true is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
])
def test_config_the_megatron_model_cannot_express(tmp_path, config, message):
    hf = write_hf(tmp_path / "hf", ARCH, config=config)
    assert_fails(tmp_path, hf, message)


def test_heads_not_divisible_by_kv_groups(tmp_path):
    hf = write_hf(tmp_path / "hf", ARCH, config={"num_key_value_heads": 3})
    assert_fails(tmp_path, hf, "num_attention_heads=4 is not a multiple of num_key_value_heads=3")


def test_missing_tensor(tmp_path):
    state = hf_state(ARCH)
    del state["model.layers.1.self_attn.v_proj.weight"]
    hf = write_hf(tmp_path / "hf", ARCH, state)
    assert_fails(tmp_path, hf, "tensor 'model.layers.1.self_attn.v_proj.weight' is missing")


def test_unexpected_tensor(tmp_path):
    state = {**hf_state(ARCH), "model.layers.0.mlp.gate_proj.bias": torch.zeros(24)}
    hf = write_hf(tmp_path / "hf", ARCH, state)
    assert_fails(tmp_path, hf, "model.safetensors: unexpected tensor "
                               "'model.layers.0.mlp.gate_proj.bias' for llama")


def test_shape_mismatch_with_the_config(tmp_path):
    hf = write_hf(tmp_path / "hf", ARCH, config={"intermediate_size": 20})
    assert_fails(tmp_path, hf, r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                               r"\[24, 16\], the config needs \[20, 16\]")


def test_layers_missing_from_a_deeper_config(tmp_path):
    hf = write_hf(tmp_path / "hf", ARCH, config={"num_hidden_layers": 3})
    assert_fails(tmp_path, hf, "tensor 'model.layers.2.self_attn.q_proj.weight' is missing")


def test_truncated_safetensors(tmp_path):
    hf = write_hf(tmp_path / "hf", ARCH)
    path = hf / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_fails(tmp_path, hf, "model.safetensors: truncated")


def test_corrupted_safetensors(tmp_path):
    hf = write_hf(tmp_path / "hf", ARCH)
    path = hf / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:8] + b"\x00garbage" + data[16:])
    assert_fails(tmp_path, hf, "model.safetensors: corrupted safetensors file: header is not "
                               "valid JSON")


def test_not_a_safetensors_checkpoint(tmp_path):
    hf = write_hf(tmp_path / "hf", ARCH)
    (hf / "model.safetensors").rename(hf / "pytorch_model.bin")
    assert_fails(tmp_path, hf, "only safetensors checkpoints are supported")


def test_existing_output_needs_force(tmp_path):
    hf = write_hf(tmp_path / "hf", ARCH)
    (tmp_path / "mg").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_fails(tmp_path, hf, r"out: already exists \(pass --force to overwrite\)",
                 out_exists=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    write_metadata(tmp_path / "mg", ARCH)  # enough of a Megatron checkpoint to get that far
    with pytest.raises(ConversionError, match="already exists"):
        convert_megatron_to_hf(tmp_path / "mg", tmp_path / "out", progress=False)


def test_megatron_side_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="opd_megatron.json: not found"):
        convert_megatron_to_hf(tmp_path, tmp_path / "hf_out", progress=False)
    assert not (tmp_path / "hf_out").exists()


def test_failure_inside_staging_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(out, force=True) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with staged_output(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)


def test_tool_prints_one_error_line_and_exits_2(tmp_path):
    state = hf_state(ARCH)
    state["model.norm.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(ARCH.to_hf_dict()))
    out = run("tools/convert_hf_to_megatron.py", "--hf-dir", str(tmp_path), "--out",
              str(tmp_path / "mg"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'model.safetensors'}: tensor 'model.norm.weight' has shape [3], "
        "the config needs [16]"]
    assert not (tmp_path / "mg").exists()


def test_score_rejects_bad_arguments_in_one_line(tmp_path):
    out = run("-m", "opd_megatron", "score", "--megatron-dir", str(tmp_path), "--input-ids", "1,2")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: --megatron-dir: ")
    assert "opd_megatron.json: not found" in out.stderr


def test_conversion_with_a_visible_gpu_says_how_to_hide_it(tmp_path, monkeypatch):
    hf = write_hf(tmp_path / "hf", ARCH)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert_fails(tmp_path, hf, "conversion runs on the CPU and a GPU is visible: use "
                               r"tools/convert_hf_to_megatron.py \(it hides the GPUs\) or set "
                               "CUDA_VISIBLE_DEVICES=")
