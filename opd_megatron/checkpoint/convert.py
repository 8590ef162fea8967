"""Offline HF <-> Megatron checkpoint conversion, single process (TP=1, PP=1).

Memory stays near one copy of the weights: the Megatron model is built uninitialised at the target
dtype, HF tensors are read straight into its parameters (through the mapping's views) and handed
over to the dist-checkpoint writer; the export builds no model, loads the saved full tensors and
streams one HF tensor at a time into pre-laid-out shards. Outputs are written into a temporary
sibling directory and renamed into place only once complete, so an error never leaves a
half-written checkpoint behind.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def staged_output(out_dir: str | Path, force: bool) -> Iterator[Path]:
    """A fresh temporary sibling of `out_dir`, renamed to `out_dir` when the block succeeds."""
    out = Path(out_dir).absolute()
    if out.exists() and not force:
        raise ConversionError(f"{out}: already exists (pass --force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled,
                dynamic_ncols=True)


def _one_process_group() -> None:
    """dist_checkpointing needs a process group: a one-rank one (TP=1, PP=1)."""
    from opd_megatron.config.schema import ParallelConfig
    from opd_megatron.runtime import distributed

    world = distributed.world_size_from_env()
    if world != 1:
        raise ConversionError(f"conversion runs in one process, got WORLD_SIZE={world} "
                              "(run it with python, not torchrun)")
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


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, dtype: str | None = None,
                           force: bool = False, progress: bool = True) -> ConversionSummary:
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
    with staged_output(out_dir, force) as tmp:
        chunks, params = _single_process_model(arch, target, mapping.padded_vocab)
        _check_params(params, mapping)
        clock.lap("set-up")
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in params:
                params[name][arch.vocab_size:].zero_()
        nbytes = sum(reader.info(p.hf_name).nbytes for p in mapping.pieces)
        with _progress(nbytes, "read HF", progress) as bar:
            for piece in mapping.pieces:
                reader.read_into(piece.hf_name, piece.view(params[piece.megatron_name]))
                bar.update(reader.info(piece.hf_name).nbytes)
        clock.lap("read HF")
        save_model(chunks, tmp, release_params=True)
        write_metadata(tmp, arch, dtype=hf_io.dtype_name(target), source=str(hf_dir.absolute()))
        hf_io.copy_side_files(hf_dir, tmp)
        clock.lap("save Megatron")
    return ConversionSummary("hf->megatron", Path(out_dir), len(mapping.pieces), nbytes,
                             clock.total(), clock.phases)


def _generation_config(arch: ModelArch) -> dict:
    cfg = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id"):
        if getattr(arch, key) is not None:
            cfg[key] = getattr(arch, key)
    return cfg


def convert_megatron_to_hf(megatron_dir: str | Path, out_dir: str | Path, *,
                           dtype: str | None = None, force: bool = False,
                           max_shard_size: str | int = "5GB",
                           progress: bool = True) -> ConversionSummary:
    """Megatron checkpoint (any saved layout) -> HF safetensors that transformers loads.

    No model is built: the checkpoint's full tensors are loaded as saved (one copy of the
    weights; loading into a model would add a merged copy of every SwiGLU fc1) and streamed
    through the mapping. `dtype` (bf16/fp16/fp32) defaults to the embedding's saved dtype.
    """
    clock = _Clock()
    megatron_dir = Path(megatron_dir)
    max_shard_bytes = hf_io.parse_size(max_shard_size)
    arch = _arch_of(read_arch, megatron_dir)
    with staged_output(out_dir, force) as tmp:
        _one_process_group()
        tensors = list(load_full_tensors(megatron_dir))
        if not tensors or tensors[0][0] != "embedding.word_embeddings.weight":
            raise CheckpointError(f"{megatron_dir / MODEL_SUBDIR}: no "
                                  "embedding.word_embeddings.weight")
        embedding = tensors[0][1]
        out_dtype = DTYPES[dtype] if dtype else embedding.dtype
        mapping = mapping_for(arch, padded_vocab=embedding.shape[0])
        clock.lap("load Megatron")
        specs = [(name, shape, out_dtype) for name, shape in mapping.hf_specs()]
        with hf_io.ShardedWriter(tmp, specs, max_shard_bytes) as writer, \
                _progress(writer.total_bytes, "write HF", progress) as bar:
            for name, tensor in megatron_to_hf_tensors(arch, tensors, mapping.padded_vocab):
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
        clock.lap("write HF")
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if not to_megatron:
        parser.add_argument("--max-shard-size", default="5GB",
                            help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    args = parser.parse_args(argv)
    kwargs = {"dtype": args.dtype, "force": args.force, "progress": not args.no_progress}
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
