"""HF safetensors checkpoints, read and written one tensor at a time.

Reading parses the safetensors header itself, then either `readinto`s a tensor straight into its
destination (a Megatron parameter, or a view of one; no intermediate copy when the dtypes match)
or maps it from the file (`mapped`, zero copy, see mapped.py). Writing lays out every
shard from the tensor specs up front, so tensors can then be streamed into their files in order
without ever holding a shard in memory.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, a JSON
header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the data;
offsets are relative to the start of the data and tile it without gaps.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from opd_megatron.checkpoint.mapped import MappedTensor, map_tensor
from opd_megatron.checkpoint.megatron_dist import ConversionError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Everything in an HF model directory besides the weights and config.json that a converted
# checkpoint must carry along (tokenizer, chat template, generation defaults).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
              "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json",
              "vocab.txt", "merges.txt", "generation_config.json")
# safetensors' own writer pads the header so that the data (and every tensor) stays 8-byte aligned.
_ALIGN = 8
_MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ConversionError):
    """A safetensors file or index that is missing, corrupted or truncated."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute position of the first byte in the file
    nbytes: int


def byte_view(tensor: torch.Tensor):
    """A writable flat uint8 numpy view of a contiguous tensor's memory (any dtype, bf16 too)."""
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


class SafetensorsFile:
    """One .safetensors file: its validated header, and reads of single tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                prefix = f.read(8)
                if len(prefix) < 8:
                    raise self._error(f"{size} bytes, too short for a safetensors header")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise self._error(f"header length {header_len} exceeds the file ({size} bytes)")
                raw = f.read(header_len)
        except OSError as err:
            raise SafetensorsError(f"{self.path}: cannot read ({err.strerror})") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._error("header is not valid JSON") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.tensors = self._validate(header, data_start=8 + header_len, size=size)

    def _error(self, message: str) -> SafetensorsError:
        return SafetensorsError(f"{self.path}: corrupted safetensors file: {message}")

    def _validate(self, header: dict, data_start: int, size: int) -> dict[str, TensorInfo]:
        tensors, spans = {}, []
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._error(f"tensor {name!r} has an invalid header entry {entry!r}") from None
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise self._error(f"tensor {name!r} spans {end - begin} bytes, its dtype and shape "
                                  f"{list(shape)} need {expected}")
            tensors[name] = TensorInfo(dtype, shape, data_start + begin, expected)
            spans.append((begin, end, name))
        position = 0
        for begin, end, name in sorted(spans):
            if begin != position:
                raise self._error(f"tensor {name!r} starts at data offset {begin}, expected {position}")
            position = end
        if data_start + position > size:
            raise SafetensorsError(f"{self.path}: truncated: the header declares "
                                   f"{data_start + position} bytes, the file has {size}")
        if data_start + position < size:
            raise self._error(f"{size - data_start - position} trailing bytes after the last tensor")
        return tensors

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Read tensor `name` into `out` (same number of elements; any shape, dtype, strides)."""
        info = self.tensors[name]
        if out.numel() != math.prod(info.shape):
            raise ConversionError(f"{self.path}: tensor {name!r} has shape {list(info.shape)}, "
                                  f"expected {out.numel()} elements")
        direct = out.dtype == info.dtype and out.is_contiguous()
        target = out if direct else torch.empty(info.shape, dtype=info.dtype)
        buffer = memoryview(byte_view(target))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(info.offset)
            done = 0
            while done < info.nbytes:  # a raw read may return less than asked for
                got = f.readinto(buffer[done:])
                if not got:
                    raise SafetensorsError(f"{self.path}: truncated while reading tensor {name!r}")
                done += got
        if not direct:
            out.copy_(target.view(out.shape))

    def mapped(self, name: str) -> MappedTensor:
        """Tensor `name` mapped from the file (the header check guarantees it is all there)."""
        info = self.tensors[name]
        return map_tensor(self.path, info.offset, info.dtype, info.shape)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        self.read_into(name, out)
        return out


class HFCheckpointReader:
    """All tensors of an HF model directory: sharded (with an index) or a single file."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index_path = self.dir / INDEX_FILE
        if index_path.is_file():
            weight_map = self._read_index(index_path)
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise SafetensorsError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} "
                                   "(only safetensors checkpoints are supported)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        self.files = {f: SafetensorsFile(self.dir / f) for f in files}
        self.location: dict[str, SafetensorsFile] = {}
        for file_name, st in self.files.items():
            for name in st.tensors:
                if weight_map is not None and weight_map.get(name) != file_name:
                    raise SafetensorsError(f"{st.path}: tensor {name!r} is not listed for this file "
                                           f"in {index_path}")
                self.location[name] = st
        if weight_map:
            for name, file_name in weight_map.items():
                if name not in self.location:
                    raise SafetensorsError(f"{self.dir / file_name}: tensor {name!r} listed in "
                                           f"{index_path} is not in the file")

    @staticmethod
    def _read_index(path: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SafetensorsError(f"{path}: not a safetensors index (no weight_map)") from None
        if not isinstance(weight_map, dict):
            raise SafetensorsError(f"{path}: weight_map is not a JSON object")
        return weight_map

    def names(self) -> list[str]:
        return list(self.location)

    def info(self, name: str) -> TensorInfo:
        return self.location[name].tensors[name]

    def read_into(self, name: str, out: torch.Tensor) -> None:
        self.location[name].read_into(name, out)

    def mapped(self, name: str) -> MappedTensor:
        return self.location[name].mapped(name)

    def dtype(self) -> torch.dtype:
        """The floating dtype most of the bytes are stored in."""
        by_dtype: dict[torch.dtype, int] = {}
        for st in self.files.values():
            for info in st.tensors.values():
                by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
        return max(by_dtype, key=by_dtype.get) if by_dtype else torch.float32


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '100KB' or a byte count (decimal units, as transformers uses)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", str(text).upper())
    if not match:
        raise ConversionError(f"--max-shard-size {text!r}: expected a size such as 5GB or 500MB")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[match.group(2)]
    return int(float(match.group(1)) * scale)


class ShardedWriter:
    """Writes declared tensors into size-capped safetensors shards, one tensor at a time.

    `specs` (name, shape, dtype) fixes every shard's header before any data is written; `write`
    must then be called once per tensor, in the declared order. One shard is written as
    model.safetensors (no index), as transformers does; more as model-0000i-of-0000N.safetensors
    plus model.safetensors.index.json.
    """

    def __init__(self, out_dir: str | Path, specs: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int):
        self.dir = Path(out_dir)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        shard_bytes = 0
        for name, shape, dtype in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            shard_bytes += nbytes
        count = len(shards)
        self._files = [SINGLE_FILE] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._order = [(name, shape, dtype, i) for i, shard in enumerate(shards)
                       for name, shape, dtype, _ in shard]
        self._shards = shards
        self._next = 0
        self._handle = None
        self._handle_index = -1
        self.total_bytes = sum(n for shard in shards for *_, n in shard)

    def _open(self, index: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header, offset = {}, 0
        for name, shape, dtype, nbytes in self._shards[index]:
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % _ALIGN)
        self._handle = open(self.dir / self._files[index], "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._handle_index = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ConversionError(f"tensor {name!r} was not declared to the writer")
        expected, shape, dtype, shard = self._order[self._next]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ConversionError(f"tensor {name!r} {list(tensor.shape)} {tensor.dtype} arrived where "
                                  f"{expected!r} {list(shape)} {dtype} was declared")
        if shard != self._handle_index:
            self._open(shard)
        self._handle.write(memoryview(byte_view(tensor.contiguous())))
        self._next += 1

    def finish(self) -> None:
        """Close the last shard and write the index; every declared tensor must have arrived."""
        if self._next != len(self._order):
            raise ConversionError(f"tensor {self._order[self._next][0]!r} was declared but never "
                                  "written")
        self.close()
        if len(self._files) > 1:
            weight_map = {name: self._files[shard] for name, _, _, shard in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def copy_side_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer/generation files present in `src` into `dst`; returns their names."""
    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def dtype_name(dtype: torch.dtype) -> str:
    """The name HF configs use ('bfloat16', 'float32', ...)."""
    return str(dtype).removeprefix("torch.")
