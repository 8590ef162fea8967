"""Safetensors reading and sharded writing, against the safetensors library; damaged files."""
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from opd_megatron.checkpoint.hf_io import (
    HFCheckpointReader,
    SafetensorsError,
    SafetensorsFile,
    ShardedWriter,
    parse_size,
)
from opd_megatron.checkpoint.megatron_dist import ConversionError

TENSORS = {
    "a.weight": torch.randn(7, 5).to(torch.bfloat16),
    "b.weight": torch.randn(3, 4, 2),
    "c.bias": torch.randn(9).to(torch.float16),
    "d.ids": torch.arange(6, dtype=torch.int64),
}


def specs():
    return [(k, tuple(v.shape), v.dtype) for k, v in TENSORS.items()]


def write(out_dir, max_bytes):
    with ShardedWriter(out_dir, specs(), max_bytes) as writer:
        for name, tensor in TENSORS.items():
            writer.write(name, tensor)
        writer.finish()
    return writer


def test_single_shard_is_read_by_safetensors(tmp_path):
    write(tmp_path, 1 << 30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, tensor in TENSORS.items():
            assert torch.equal(f.get_tensor(name), tensor)


def test_shards_respect_the_cap_and_the_index_lists_them(tmp_path):
    write(tmp_path, 80)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in TENSORS.values())
    reader = HFCheckpointReader(tmp_path)
    for name, tensor in TENSORS.items():
        out = torch.empty_like(tensor)
        reader.read_into(name, out)
        assert torch.equal(out, tensor)


def test_reads_files_written_by_safetensors_into_views_and_other_dtypes(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors", metadata={"format": "pt"})
    st = SafetensorsFile(tmp_path / "model.safetensors")
    big = torch.zeros(4, 7, 5)
    st.read_into("a.weight", big[2])  # contiguous view, dtype cast bf16 -> fp32
    assert torch.equal(big[2], TENSORS["a.weight"].float())
    strided = torch.zeros(5, 7).t()  # non-contiguous destination
    st.read_into("a.weight", strided)
    assert torch.equal(strided, TENSORS["a.weight"].float())
    assert torch.equal(st.read("d.ids"), TENSORS["d.ids"])
    with pytest.raises(ConversionError, match=r"'b.weight' has shape \[3, 4, 2\]"):
        st.read_into("b.weight", torch.empty(5))


def test_writer_refuses_undeclared_order_and_incomplete_output(tmp_path):
    with ShardedWriter(tmp_path, specs(), 1 << 30) as writer:
        with pytest.raises(ConversionError, match="'b.weight' .* arrived where 'a.weight'"):
            writer.write("b.weight", TENSORS["b.weight"])
        writer.write("a.weight", TENSORS["a.weight"])
        with pytest.raises(ConversionError, match="'b.weight' was declared but never written"):
            writer.finish()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8
    assert parse_size("1.5kb") == 1500 and parse_size(123) == 123
    with pytest.raises(ConversionError, match="--max-shard-size 'lots'"):
        parse_size("lots")


def damaged(tmp_path, edit) -> str:
    save_file(TENSORS, tmp_path / "model.safetensors", metadata={"format": "pt"})
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(edit(data)))
    return str(path)


def header_len(data) -> int:
    return struct.unpack("<Q", bytes(data[:8]))[0]


def set_header(data, header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + header_len(data):]


def header_of(data) -> dict:
    return json.loads(bytes(data[8:8 + header_len(data)]))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d[:-10], "truncated: the header declares"),
    (lambda d: d[:5], "too short for a safetensors header"),
    (lambda d: struct.pack("<Q", 1 << 40) + d[8:], "header length 1099511627776 exceeds"),
    (lambda d: d[:8] + b"#" * header_len(d) + d[8 + header_len(d):], "header is not valid JSON"),
    (lambda d: d + b"extra", "5 trailing bytes after the last tensor"),
    (lambda d: set_header(d, {**header_of(d), "c.bias": {**header_of(d)["c.bias"],
                                                          "shape": [10]}}),
     "tensor 'c.bias' spans 18 bytes, its dtype and shape \\[10\\] need 20"),
    (lambda d: set_header(d, {**header_of(d), "c.bias": {**header_of(d)["c.bias"],
                                                          "dtype": "Q7"}}),
     "tensor 'c.bias' has an invalid header entry"),
])
def test_damaged_files_are_one_line_errors(tmp_path, edit, message):
    path = damaged(tmp_path, edit)
    with pytest.raises(SafetensorsError, match=message) as err:
        HFCheckpointReader(tmp_path)
    assert path in str(err.value) and "\n" not in str(err.value)


def test_index_problems(tmp_path):
    with pytest.raises(SafetensorsError, match="no model.safetensors or model.safetensors.index"):
        HFCheckpointReader(tmp_path)
    write(tmp_path, 80)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(SafetensorsError, match="model-00002-of-00003.safetensors: cannot read"):
        HFCheckpointReader(tmp_path)
    write(tmp_path, 80)
    index["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match="tensor 'ghost.weight' listed in"):
        HFCheckpointReader(tmp_path)
    index_path.write_text("{}")
    with pytest.raises(SafetensorsError, match="not a safetensors index"):
        HFCheckpointReader(tmp_path)
