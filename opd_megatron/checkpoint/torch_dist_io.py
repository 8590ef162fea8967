"""The torch_dist checkpoint format, written and read in this process for one-shot conversion.

megatron-core writes torch_dist checkpoints for training: forked writer processes (so that
training can go on), results collected through a spawned multiprocessing Manager, an fsync per
file. A conversion has nothing to overlap with, and these cost more than the I/O itself (for a
2.2 GB checkpoint: the Manager process alone imports torch for about 2 s). `InProcessTorchDistSave`
is a megatron-core save strategy that produces the same format (the same key translation and save
planner, torch.distributed.checkpoint's writer and metadata) in this process.

`iter_full_tensors` reads the weights of any torch_dist checkpoint, whatever layout saved it,
straight from its files without building a model or a process group: each stored chunk is one
`torch.save` archive at a recorded offset, mapped from the file (see mapped.py) and used as is when
it is a whole tensor (or a whole layer of a layer-stacked tensor), else assembled; a checkpoint is
streamed layer by layer.
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch
from megatron.core.dist_checkpointing.core import maybe_load_config
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from opd_megatron.checkpoint.mapped import map_tensor
from opd_megatron.checkpoint.megatron_dist import CheckpointError

# Prefix of the per-layer weights, which dist checkpoints store stacked along a leading layer axis.
LAYERS = "decoder.layers."
_EMBEDDING = "embedding.word_embeddings.weight"


class _WriterPlanner(MCoreSavePlanner):
    """megatron-core's save planner, handing the writer each tensor through `source` (when given)
    and views as tensors of their own (aliasing) storage.

    `torch.save` of a view writes its whole storage, so torch's writer clones every view first;
    megatron saves the SwiGLU fc1 weight as two halves, a third of a Llama's bytes. A contiguous
    view re-based on a slice of its storage shares the memory and saves only its own bytes.
    """

    def __init__(self, source: Callable[[torch.Tensor], torch.Tensor] | None, **kwargs):
        super().__init__(**kwargs)
        self._source = source

    def resolve_data(self, write_item):
        data = super().resolve_data(write_item)
        if not isinstance(data, torch.Tensor):
            return data
        if self._source is not None:
            data = self._source(data)
        if data.is_contiguous() and data.untyped_storage().nbytes() != data.nbytes:
            start = data.storage_offset() * data.element_size()
            storage = data.untyped_storage()[start:start + data.nbytes]
            data = torch.empty(0, dtype=data.dtype).set_(storage, 0, data.shape)
        return data


class InProcessTorchDistSave(SaveShardedStrategy):
    """A megatron-core save strategy writing torch_dist format synchronously, in this process.

    Its checkpoints are read by megatron-core's own torch_dist loader at any layout (the
    conversion tests load them at TP=2, PP=2 and TP2xPP2). Files are not fsynced: a caller that
    needs durability syncs them (see convert.staged_output).

    `source`, when given, is called with each tensor of the state dict (a parameter or a view of
    one) right before it is written, and returns the tensor whose bytes to write in its place
    (same shape and dtype): a conversion serves the bytes from the source files without ever
    filling the parameters.
    """

    def __init__(self, source: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__("torch_dist", 1)
        self._source = source

    @property
    def can_handle_sharded_objects(self):
        return True

    def save(self, sharded_state_dict, checkpoint_dir):
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                  keep_only_main_replica=True)
        writer = dcp.FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                      sync_files=False, thread_count=1)
        # torch.load never checks a record's CRC-32; computing it costs ~30% of a save.
        crc32 = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            dcp.save(mcore_to_pyt_state_dict(by_key, False), storage_writer=writer,
                     planner=_WriterPlanner(self._source, flatten_state_dict=False))
        finally:
            torch.serialization.set_crc32_options(crc32)


class _FileSlice(io.RawIOBase):
    """A seekable read-only window [offset, offset + length) of an open binary file."""

    def __init__(self, file: BinaryIO, offset: int, length: int):
        self._file, self._offset, self._length, self._pos = file, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        count = min(len(buffer), self._length - self._pos)
        if count <= 0:
            return 0
        self._file.seek(self._offset + self._pos)
        got = self._file.readinto(memoryview(buffer)[:count]) or 0
        self._pos += got
        return got


# The storage classes `torch.save` names in a tensor record.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _TensorRecordUnpickler(pickle.Unpickler):
    """Reads the data.pkl of a one-tensor `torch.save` archive without building the tensor.

    Only the names such an archive references are resolved (nothing else can run); `load`
    returns ((storage type name, record key, storage numel), storage offset, size, stride).
    """

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: (storage, offset, tuple(size),
                                                              tuple(stride))
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        raise pickle.UnpicklingError(f"unexpected {module}.{name} in a tensor record")

    def persistent_load(self, pid):
        _, storage_type, key, _, numel = pid
        return storage_type, key, numel


def _row_major(size: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for extent, step in reversed(list(zip(size, stride))):
        if extent > 1 and step != expected:
            return False
        expected *= extent
    return True


def _member_span(archive: zipfile.ZipFile, slice_: _FileSlice, name: str) -> tuple[int, int]:
    """(start, length) of an uncompressed archive member's bytes within the slice."""
    member = archive.getinfo(name)
    if member.compress_type != zipfile.ZIP_STORED:
        raise zipfile.BadZipFile(f"{name} is compressed")
    slice_.seek(member.header_offset)
    header = slice_.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return member.header_offset + 30 + name_length + extra_length, member.file_size


class _ChunkReader:
    """Loads stored chunks of a torch_dist checkpoint by (key, chunk index).

    A chunk is a one-tensor `torch.save` archive at a recorded offset of a .distcp file. When its
    storage is exactly the tensor, contiguous (what megatron-core's and torch's writers store),
    the tensor is mapped from the file; anything else goes through `torch.load`.
    """

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        try:
            self.metadata = dcp.FileSystemReader(str(model_dir)).read_metadata()
        except Exception as err:  # unpickling a damaged file raises whatever it trips on
            raise CheckpointError(f"{model_dir}: unreadable torch_dist metadata "
                                  f"({type(err).__name__}: {err})") from None
        self._files: dict[str, BinaryIO] = {}

    def _handle(self, relative_path: str, key: str) -> BinaryIO:
        handle = self._files.get(relative_path)
        if handle is None:
            path = self.dir / relative_path
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (holds tensor {key!r})")
            handle = self._files[relative_path] = open(path, "rb", buffering=0)
        return handle

    def _mapped(self, path: Path, window: _FileSlice, offset: int, dtype: torch.dtype,
                sizes: tuple[int, ...]) -> torch.Tensor | None:
        """The chunk mapped from the file, or None unless its record is a plain row-major storage
        of exactly the tensor (then `torch.load` reads it, or says what is wrong with it)."""
        try:
            archive = zipfile.ZipFile(window)
            (pickle_name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            start, length = _member_span(archive, window, pickle_name)
            window.seek(start)
            (type_name, record, numel), storage_offset, size, stride = \
                _TensorRecordUnpickler(io.BytesIO(window.read(length))).load()
            data_name = f"{pickle_name.removesuffix('data.pkl')}data/{record}"
            start, length = _member_span(archive, window, data_name)
        except (zipfile.BadZipFile, pickle.UnpicklingError, KeyError, TypeError, ValueError,
                struct.error, EOFError):
            return None
        plain = (_STORAGE_DTYPES.get(type_name) == dtype and size == sizes and storage_offset == 0
                 and numel == math.prod(sizes) and _row_major(size, stride)
                 and length == numel * dtype.itemsize)
        return map_tensor(path, offset + start, dtype, sizes).tensor if plain else None

    def load(self, key: str, index: int) -> torch.Tensor:
        meta = self.metadata.state_dict_metadata[key]
        chunk = meta.chunks[index]
        info = self.metadata.storage_data.get(MetadataIndex(key, chunk.offsets, index))
        if info is None:
            raise CheckpointError(f"{self.dir}: tensor {key!r} chunk at {list(chunk.offsets)} "
                                  "has no storage entry")
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(f"{self.dir}: tensor {key!r} is stored with transforms "
                                  f"{info.transform_descriptors}, which this reader does not undo")
        handle = self._handle(info.relative_path, key)
        path = self.dir / info.relative_path
        if info.offset + info.length > os.fstat(handle.fileno()).st_size:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} needs bytes up to "
                                  f"{info.offset + info.length}")
        window = _FileSlice(handle, info.offset, info.length)
        sizes = tuple(chunk.sizes)
        try:
            tensor = self._mapped(path, window, info.offset, meta.properties.dtype, sizes)
            if tensor is None:
                window.seek(0)
                tensor = torch.load(window, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged record raises whatever its parser trips on
            first_line = next(iter(str(err).strip().splitlines()), "")
            raise CheckpointError(f"{path}: tensor {key!r} at byte {info.offset} is unreadable "
                                  f"({type(err).__name__}: {first_line})") from None
        if tuple(tensor.shape) != sizes:
            raise CheckpointError(f"{path}: tensor {key!r} chunk has shape "
                                  f"{list(tensor.shape)}, the metadata says {list(sizes)}")
        return tensor

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


def _region(reader: _ChunkReader, key: str, starts: tuple[int, ...],
            sizes: tuple[int, ...]) -> torch.Tensor:
    """The box [starts, starts + sizes) of tensor `key`: a stored chunk as is when one matches,
    else assembled from every chunk that intersects it."""
    meta = reader.metadata.state_dict_metadata[key]
    chunks = meta.chunks
    for index, chunk in enumerate(chunks):
        if tuple(chunk.offsets) == starts and tuple(chunk.sizes) == sizes:
            return reader.load(key, index)
    out = torch.empty(sizes, dtype=meta.properties.dtype)
    covered = 0
    for index, chunk in enumerate(chunks):
        lo = [max(s, o) for s, o in zip(starts, chunk.offsets)]
        hi = [min(s + n, o + m) for s, n, o, m in zip(starts, sizes, chunk.offsets, chunk.sizes)]
        if any(h <= l for l, h in zip(lo, hi)):
            continue
        src = reader.load(key, index)
        dst = out
        for dim, (l, h) in enumerate(zip(lo, hi)):
            src = src.narrow(dim, l - chunk.offsets[dim], h - l)
            dst = dst.narrow(dim, l - starts[dim], h - l)
        dst.copy_(src)
        covered += math.prod(h - l for l, h in zip(lo, hi))
    if covered != math.prod(sizes):
        raise CheckpointError(f"{reader.dir}: tensor {key!r}: the stored chunks cover {covered} of "
                              f"the {math.prod(sizes)} elements at {list(starts)}+{list(sizes)}")
    return out


def iter_full_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of a torch_dist checkpoint directory as a full (TP=1) tensor, whatever layout
    saved it: the embedding first, then layer by layer in model order under the layer-indexed name
    (decoder.layers.3.mlp.linear_fc1.weight), then the rest. Holds about one layer at a time."""
    model_dir = Path(model_dir)
    config = maybe_load_config(str(model_dir))
    if config is None or config.sharded_backend != "torch_dist":
        found = "no metadata.json" if config is None else f"format {config.sharded_backend!r}"
        raise CheckpointError(f"{model_dir}: not a torch_dist checkpoint ({found})")
    reader = _ChunkReader(model_dir)
    try:
        tensors = {key: meta for key, meta in reader.metadata.state_dict_metadata.items()
                   if isinstance(meta, TensorStorageMetadata)}
        stacked = {key: meta for key, meta in tensors.items() if key.startswith(LAYERS)}
        rest = [key for key in tensors if key not in stacked and key != _EMBEDDING]
        if _EMBEDDING in tensors:
            yield _EMBEDDING, _region(reader, _EMBEDDING, (0,) * len(tensors[_EMBEDDING].size),
                                      tuple(tensors[_EMBEDDING].size))
        layers: dict[int, list[str]] = defaultdict(list)
        for key, meta in stacked.items():
            for layer in range(meta.size[0]):
                layers[layer].append(key)
        for layer in sorted(layers):
            for key in layers[layer]:
                size = tuple(stacked[key].size)
                block = _region(reader, key, (layer,) + (0,) * (len(size) - 1), (1,) + size[1:])
                yield f"{LAYERS}{layer}.{key[len(LAYERS):]}", block[0]
        for key in rest:
            yield key, _region(reader, key, (0,) * len(tensors[key].size), tuple(tensors[key].size))
    finally:
        reader.close()
