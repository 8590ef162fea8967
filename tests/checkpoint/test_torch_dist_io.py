"""Reading torch_dist checkpoints straight from their files (torch_dist_io): mapped and
torch.load-ed chunks, layer-stacked tensors split back into layers, and damaged checkpoints.

The checkpoints here are written by torch.distributed.checkpoint in this process (no process
group, no model); megatron-core's own writers and loader are exercised by the conversion tests
and tests/checkpoint/workers/torch_dist_worker.py."""
import re

import pytest
import torch
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from torch.distributed import checkpoint as dcp

from opd_megatron.checkpoint import torch_dist_io
from opd_megatron.checkpoint.convert import convert_megatron_to_hf
from opd_megatron.checkpoint.hf_io import HFCheckpointReader
from opd_megatron.checkpoint.mapping import hf_to_megatron_tensors
from opd_megatron.checkpoint.megatron_dist import CheckpointError, write_metadata
from tests.checkpoint.conftest import run_python
from tests.checkpoint.hf_fixtures import hf_state, tiny_arch
from tests.launch import last_json

ARCH = tiny_arch("llama")


def save_torch_dist(model_dir, state: dict[str, torch.Tensor]) -> None:
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(model_dir)), no_dist=True)
    save_config(CheckpointingConfig("torch_dist", 1), str(model_dir))


def write_megatron_checkpoint(ckpt_dir, hf: dict[str, torch.Tensor]) -> None:
    """The Megatron checkpoint of an HF state: per-layer weights stacked along a leading layer
    axis (one stored chunk for all layers, so reading a layer cuts it out of the chunk)."""
    flat = dict(hf_to_megatron_tensors(ARCH, hf.items()))
    state, layers = {}, {}
    for name, tensor in flat.items():
        match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.+)", name)
        if match:
            layers.setdefault(match[2], {})[int(match[1])] = tensor
        else:
            state[name] = tensor
    for key, by_layer in layers.items():
        state[f"decoder.layers.{key}"] = torch.stack([by_layer[i] for i in sorted(by_layer)])
    save_torch_dist(ckpt_dir / "model", state)
    write_metadata(ckpt_dir, ARCH)


def test_in_process_save_is_read_by_megatron_and_stores_views_compactly(tmp_path):
    report = last_json(run_python("tests/checkpoint/workers/torch_dist_worker.py",
                                  str(tmp_path / "model")).stdout)
    assert report["megatron_load_fc1"] and report["megatron_load_norm"]
    assert report["read_fc1"] and report["read_norm"]
    # Each fc1 half stored alone (a whole-storage copy would add 1 MiB); ~1.5 KiB per record.
    assert 0 < report["stored_bytes"] - report["tensor_bytes"] < 3 * 2048
    assert report["asked"] == [[256], [512, 256], [512, 256]]


def test_compact_chunks_are_mapped_the_rest_loaded(tmp_path, monkeypatch):
    mapped = []
    real_map = torch_dist_io.map_tensor
    monkeypatch.setattr(torch_dist_io, "map_tensor",
                        lambda *a, **k: mapped.append(a[2]) or real_map(*a, **k))
    whole = torch.randn(6, 4).to(torch.bfloat16)
    transposed = torch.randn(5, 3).t()           # stored with its strides: not row-major
    view = torch.arange(10.0)[2:7]               # torch's writer stores a compact copy
    save_torch_dist(tmp_path, {"whole": whole, "transposed": transposed, "view": view})
    tensors = dict(torch_dist_io.iter_full_tensors(tmp_path))
    assert torch.equal(tensors["whole"], whole) and tensors["whole"].dtype == torch.bfloat16
    assert torch.equal(tensors["transposed"], transposed)
    assert torch.equal(tensors["view"], view)
    assert sorted(map(str, mapped)) == ["torch.bfloat16", "torch.float32"]  # whole, view
    tensors["whole"].add_(1)  # private mapping: the file is unchanged
    assert torch.equal(dict(torch_dist_io.iter_full_tensors(tmp_path))["whole"], whole)


def test_layer_stacked_tensors_come_back_per_layer_in_model_order(tmp_path):
    hf = hf_state(ARCH)
    write_megatron_checkpoint(tmp_path, hf)
    names = [name for name, _ in torch_dist_io.iter_full_tensors(tmp_path / "model")]
    assert names[0] == "embedding.word_embeddings.weight"
    layer_of = [int(m[1]) for m in map(re.compile(r"decoder\.layers\.(\d+)\.").match, names) if m]
    assert layer_of == sorted(layer_of) and set(layer_of) == {0, 1}
    assert names[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]


def test_export_of_a_stacked_checkpoint_is_bit_identical(tmp_path):
    hf = hf_state(ARCH)
    write_megatron_checkpoint(tmp_path / "mg", hf)
    convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", fsync=True, progress=False)
    reader = HFCheckpointReader(tmp_path / "hf")
    assert sorted(reader.names()) == sorted(hf)
    for name, tensor in hf.items():
        out = torch.empty_like(tensor)
        reader.read_into(name, out)
        assert torch.equal(out, tensor), name


def test_not_a_torch_dist_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"not a torch_dist checkpoint \(no metadata.json\)"):
        next(torch_dist_io.iter_full_tensors(tmp_path))


def damaged_export(tmp_path, damage) -> CheckpointError:
    write_megatron_checkpoint(tmp_path / "mg", hf_state(ARCH))
    (data_file,) = (tmp_path / "mg" / "model").glob("*.distcp")
    damage(data_file)
    with pytest.raises(CheckpointError) as err:
        convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mg"]  # no output, no staging left
    return err.value


def test_truncated_data_file(tmp_path):
    err = damaged_export(tmp_path, lambda f: f.write_bytes(f.read_bytes()[:-100]))
    assert re.search(r"__0_0\.distcp: truncated: tensor '[^']+' needs bytes up to \d+", str(err))


def test_corrupted_data_file(tmp_path):
    err = damaged_export(tmp_path, lambda f: f.write_bytes(b"\x00" * f.stat().st_size))
    assert re.search(r"__0_0\.distcp: tensor '[^']+' at byte \d+ is unreadable", str(err))


def test_missing_data_file(tmp_path):
    err = damaged_export(tmp_path, lambda f: f.unlink())
    assert re.search(r"__0_0\.distcp: missing \(holds tensor '[^']+'\)", str(err))


def test_unreadable_metadata(tmp_path):
    err = damaged_export(tmp_path, lambda f: (f.parent / ".metadata").write_bytes(b"garbage"))
    assert re.search(r"model: unreadable torch_dist metadata \(UnpicklingError: ", str(err))
