"""Offline HF <-> Megatron checkpoint conversion, single process (TP=1, PP=1).

Every byte is read once and written once, and memory stays well under one copy of the weights:
the Megatron model is built uninitialised at the target dtype (its memory is never touched unless
a parameter has to be assembled, as the fused QKV is) and an in-process torch_dist writer
(`torch_dist_io.InProcessTorchDistSave`) takes each tensor it writes from the HF files, mapped from
the page cache wherever the layouts agree (`_ParamsFromHF`); the export builds no model and no
process group, maps the saved tensors layer by layer from the checkpoint files and writes one HF
tensor at a time into pre-laid-out shards. Outputs are written into a temporary sibling directory
and renamed into place only once complete, so an error never leaves a half-written checkpoint
behind; `fsync=True` also makes the renamed output durable against a crash of the machine.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from opd_megatron.checkpoint import hf_io
from opd_megatron.checkpoint.mapping import (
    MappingError,
    canonical_megatron_name,
    mapping_for,
    megatron_to_hf_tensors,
)
from opd_megatron.checkpoint.mapped import MappedTensor
from opd_megatron.checkpoint.megatron_dist import (
    MODEL_SUBDIR,
    CheckpointError,
    ConversionError,
    load_full_tensors,
    read_arch,
    save_model,
    write_metadata,
)
from opd_megatron.models.arch import ArchitectureError, ModelArch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_HF_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ConversionSummary:
    direction: str
    out_dir: Path
    tensors: int
    bytes: int
    seconds: float
    phases: dict[str, float]  # seconds of each phase, in order

    def line(self) -> str:
        gb = self.bytes / 1e9
        phases = ", ".join(f"{name} {sec:.1f} s" for name, sec in self.phases.items())
        return (f"{self.direction}: {self.tensors} tensors, {gb:.3f} GB in {self.seconds:.1f} s "
                f"({gb / max(self.seconds, 1e-9):.2f} GB/s; {phases}) -> {self.out_dir}")


class _Clock:
    """Seconds spent in each named phase."""

    def __init__(self):
        self.start = self._last = time.time()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.time()
        self.phases[name] = now - self._last
        self._last = now

    def total(self) -> float:
        return time.time() - self.start


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staged_output(out_dir: str | Path, force: bool, fsync: bool = False) -> Iterator[Path]:
    """A fresh temporary sibling of `out_dir`, renamed to `out_dir` when the block succeeds.

    With `fsync`, every file and directory written is flushed to disk before the rename and the
    rename itself after it, so that a machine crash cannot leave a renamed but incomplete output.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise ConversionError(f"{out}: already exists (pass --force to overwrite)")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        raise ConversionError(_write_failure(out, err) or f"{out}: cannot create ({err})") from None
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        try:
            yield tmp
        except (OSError, RuntimeError, CheckpointException) as err:
            # Classified before the finally below frees the space the partial output took.
            message = _write_failure(out, err)
            if message is None:
                raise
            raise ConversionError(message) from None
        if fsync:
            for path in sorted(tmp.rglob("*"), reverse=True) + [tmp]:  # entries, then their dir
                _fsync(path)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        if fsync:
            _fsync(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_UNWRITABLE = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EFBIG: "file too large for the file system"}


def _write_failure(out: Path, err: Exception) -> str | None:
    """One line for an output that could not be written (nothing is left of it), or None.

    torch's zip writer reports a full disk as RuntimeError("unexpected pos ..."), without the
    errno: a failed write on a file system with (almost) no space left is read as that.
    """
    failures = getattr(err, "failures", None)   # torch.distributed.checkpoint's: rank -> (exc, tb)
    if failures:
        err = next(iter(failures.values()))[0]
    problem = _UNWRITABLE.get(getattr(err, "errno", None))
    if problem is None and isinstance(err, RuntimeError):
        try:
            stat = os.statvfs(out.parent)
        except OSError:
            return None
        if stat.f_bavail * stat.f_frsize >= 1 << 20:
            return None
        problem = _UNWRITABLE[errno.ENOSPC]
    if problem is None:
        return None
    return f"{out}: {problem} while writing the output (nothing was left behind)"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled,
                dynamic_ncols=True)


def _one_process_group() -> None:
    """dist_checkpointing needs a process group: a one-rank one (TP=1, PP=1), on the CPU.

    The model the conversion builds must be the CPU one (local layer spec, host memory: its
    parameters are filled from files); with a GPU visible, Megatron would build it on the GPU.
    """
    from opd_megatron.config.schema import ParallelConfig
    from opd_megatron.runtime import distributed

    world = distributed.world_size_from_env()
    if world != 1:
        raise ConversionError(f"conversion runs in one process, got WORLD_SIZE={world} "
                              "(run it with python, not torchrun)")
    if torch.cuda.is_available():
        raise ConversionError("conversion runs on the CPU and a GPU is visible: use "
                              "tools/convert_hf_to_megatron.py (it hides the GPUs) or set "
                              "CUDA_VISIBLE_DEVICES=")
    distributed.initialize(ParallelConfig(), seed=0)


def _single_process_model(arch: ModelArch, dtype: torch.dtype, padded_vocab: int):
    """Uninitialised TP1PP1 GPTModel with parameters at `dtype`, and its parameters by name."""
    from opd_megatron.config.schema import ParallelConfig, PrecisionConfig
    from opd_megatron.models.builder import build_model_chunks

    _one_process_group()
    # padded_vocab itself as the divisor yields exactly padded_vocab rows (vocab <= padded).
    chunks = build_model_chunks(arch, ParallelConfig(), PrecisionConfig(), params_dtype=dtype,
                                initialize=False, make_vocab_size_divisible_by=padded_vocab)
    model = chunks[0]
    model.requires_grad_(False)
    params = {canonical_megatron_name(n): p for n, p in model.named_parameters()}
    return chunks, params


def _check_params(params: dict[str, torch.Tensor], mapping) -> None:
    """The model the builder made must have exactly the tensors the mapping fills."""
    for name, shape in mapping.megatron_shapes.items():
        if name not in params or tuple(params[name].shape) != shape:
            got = list(params[name].shape) if name in params else "nothing"
            raise MappingError(f"Megatron model has {got} for {name!r}, the mapping expects "
                               f"{list(shape)}")
    extra = sorted(set(params) - set(mapping.megatron_shapes))
    if extra:
        raise MappingError(f"Megatron model parameter {extra[0]!r} has no HF counterpart")


def _arch_of(load, source) -> ModelArch:
    try:
        return load(source)
    except ArchitectureError as err:
        raise ConversionError(str(err)) from None


class _ParamsFromHF:
    """The bytes of the Megatron parameters, served to the checkpoint writer from the HF files.

    The writer asks for each tensor it writes (a parameter, or a half of the SwiGLU fc1). When a
    single HF tensor is exactly that tensor's memory (the same bytes in the same order and dtype:
    MLP, attention output and norm weights, fc1 halves, an unpadded vocabulary), the HF tensor is
    mapped from the file and written from the page cache; its pages are released once the next
    tensor is asked for (the writer keeps references until the file is closed). Other parameters
    (the fused QKV, a padded vocabulary, a changed dtype) are filled from the HF tensors on first
    use, so only they take memory.
    """

    def __init__(self, reader: hf_io.HFCheckpointReader, mapping, params: dict[str, torch.Tensor],
                 vocab_size: int, bar):
        self._reader, self._params, self._vocab_size, self._bar = reader, params, vocab_size, bar
        self._owner = {param.untyped_storage().data_ptr(): name for name, param in params.items()}
        self._pieces: dict[str, list] = {}
        for piece in mapping.pieces:
            self._pieces.setdefault(piece.megatron_name, []).append(piece)
        self._filled: set[str] = set()
        self._last_mapped: MappedTensor | None = None

    def __call__(self, data: torch.Tensor) -> torch.Tensor:
        self.release()
        name = self._owner[data.untyped_storage().data_ptr()]
        param = self._params[name]
        for piece in self._pieces[name]:
            view = piece.view(param)
            if (view.data_ptr() == data.data_ptr() and view.numel() == data.numel()
                    and view.is_contiguous() and data.is_contiguous()
                    and self._reader.info(piece.hf_name).dtype == data.dtype):
                self._last_mapped = self._reader.mapped(piece.hf_name)
                self._bar.update(data.nbytes)
                return self._last_mapped.tensor.view(data.shape)
        if name not in self._filled:
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                param[self._vocab_size:].zero_()
            for piece in self._pieces[name]:
                self._reader.read_into(piece.hf_name, piece.view(param))
            self._filled.add(name)
        self._bar.update(data.nbytes)
        return data

    def release(self) -> None:
        if self._last_mapped is not None:
            self._last_mapped.release()
            self._last_mapped = None


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
                           force: bool = False, fsync: bool = False,
                           progress: bool = True) -> ConversionSummary:
    """HF safetensors checkpoint -> self-describing Megatron checkpoint (see megatron_dist.py).

    `dtype` (bf16/fp16/fp32) defaults to the HF config's dtype, else the tensors' own.
    """
    clock = _Clock()
    hf_dir = Path(hf_dir)
    arch = _arch_of(ModelArch.from_hf_dir, hf_dir)
    mapping = mapping_for(arch)
    reader = hf_io.HFCheckpointReader(hf_dir)
    mapping.check_hf_shapes({name: reader.info(name).shape for name in reader.names()},
                            where=lambda name: str(reader.location[name].path if name else hf_dir))
    config_dtype = arch.extra_hf_fields.get("dtype") or arch.extra_hf_fields.get("torch_dtype")
    target = DTYPES[dtype] if dtype else _HF_DTYPES.get(config_dtype) or reader.dtype()
    with staged_output(out_dir, force, fsync) as tmp:
        chunks, params = _single_process_model(arch, target, mapping.padded_vocab)
        _check_params(params, mapping)
        clock.lap("set-up")
        nbytes = sum(p.numel() * p.element_size() for p in params.values())
        from opd_megatron.checkpoint.torch_dist_io import InProcessTorchDistSave

        with _progress(nbytes, "convert", progress) as bar:
            source = _ParamsFromHF(reader, mapping, params, arch.vocab_size, bar)
            save_model(chunks, tmp, sharded_strategy=InProcessTorchDistSave(source))
            source.release()
        write_metadata(tmp, arch, dtype=hf_io.dtype_name(target), source=str(hf_dir.absolute()))
        hf_io.copy_side_files(hf_dir, tmp)
        clock.lap("HF -> Megatron")
    if fsync:
        clock.lap("fsync")
    return ConversionSummary("hf->megatron", Path(out_dir), len(mapping.pieces), nbytes,
                             clock.total(), clock.phases)


def _generation_config(arch: ModelArch) -> dict:
    cfg = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(arch, key) is not None:
            cfg[key] = getattr(arch, key)
    return cfg


def convert_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, *,
                           dtype: str | None = None, force: bool = False, fsync: bool = False,
                           max_shard_size: str | int = "5GB",
                           progress: bool = True) -> ConversionSummary:
    """Megatron checkpoint (any saved layout) -> HF safetensors that transformers loads.

    No model is built: the checkpoint's full tensors are streamed from its files layer by layer
    (loading into a model would add a merged copy of every SwiGLU fc1) and through the mapping.
    `dtype` (bf16/fp16/fp32) defaults to the embedding's saved dtype.
    """
    clock = _Clock()
    megatron_dir = Path(megatron_dir)
    max_shard_bytes = hf_io.parse_size(max_shard_size)
    arch = _arch_of(read_arch, megatron_dir)
    with staged_output(out_dir, force, fsync) as tmp:
        tensors = load_full_tensors(megatron_dir)
        first = next(tensors, None)
        if first is None or first[0] != "embedding.word_embeddings.weight":
            raise CheckpointError(f"{megatron_dir / MODEL_SUBDIR}: no "
                                  "embedding.word_embeddings.weight")
        embedding = first[1]
        out_dtype = DTYPES[dtype] if dtype else embedding.dtype
        mapping = mapping_for(arch, padded_vocab=embedding.shape[0])
        specs = [(name, shape, out_dtype) for name, shape in mapping.hf_specs()]
        with hf_io.ShardedWriter(tmp, specs, max_shard_bytes) as writer, \
                _progress(writer.total_bytes, "convert", progress) as bar:
            for name, tensor in megatron_to_hf_tensors(arch, itertools.chain([first], tensors),
                                                       mapping.padded_vocab):
                writer.write(name, tensor.to(out_dtype))
                bar.update(tensor.numel() * out_dtype.itemsize)
            writer.finish()
        config = {**arch.to_hf_dict(), "dtype": hf_io.dtype_name(out_dtype),
                  # transformers 4.x (what vLLM pins) reads the older key.
                  "torch_dtype": hf_io.dtype_name(out_dtype)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        hf_io.copy_side_files(megatron_dir, tmp)
        if not (tmp / "generation_config.json").exists():
            (tmp / "generation_config.json").write_text(
                json.dumps(_generation_config(arch), indent=2))
        clock.lap("stream Megatron -> HF")
    if fsync:
        clock.lap("fsync")
    return ConversionSummary("megatron->hf", Path(out_dir), len(specs), writer.total_bytes,
                             clock.total(), clock.phases)


def main(direction: str, argv: list[str] | None = None) -> int:
    """The command line of tools/convert_hf_to_megatron.py and tools/convert_megatron_to_hf.py."""
    import argparse
    import sys

    to_megatron = direction == "hf-to-megatron"
    source = "--hf-dir" if to_megatron else "--megatron-dir"
    parser = argparse.ArgumentParser(description=f"Convert a checkpoint {direction}.")
    parser.add_argument(source, dest="source", required=True, help="checkpoint to convert")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="parameter dtype (default: the source checkpoint's)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--fsync", action="store_true",
                        help="flush the output to disk before it is renamed into place")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if not to_megatron:
        parser.add_argument("--max-shard-size", default="5GB",
                            help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    args = parser.parse_args(argv)
    kwargs = {"dtype": args.dtype, "force": args.force, "fsync": args.fsync,
              "progress": not args.no_progress}
    from opd_megatron.runtime import distributed

    try:
        if to_megatron:
            summary = convert_hf_to_megatron(args.source, args.out, **kwargs)
        else:
            summary = convert_megatron_to_hf(args.source, args.out,
                                             max_shard_size=args.max_shard_size, **kwargs)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            distributed.shutdown()
    print(summary.line(), flush=True)
    return 0
