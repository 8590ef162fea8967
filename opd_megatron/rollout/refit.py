"""Weight refit: the Megatron student's parameters streamed into a colocated rollout engine.

Every rank runs the same pipeline over the same parameter list, in the same order:
  1. each parameter's tensor-parallel shards are all-gathered into the full (TP=1) tensor, one
     parameter at a time (strided shards such as SwiGLU's [gate_i; up_i] are regrouped);
  2. with pipeline parallelism the stage that owns it broadcasts it to the other stages: every
     colocated vLLM worker loads the whole model and cuts its own vLLM-TP shard from it;
  3. the checkpoint package's mapping turns the Megatron tensors into HF (name, tensor) pairs in
     HF export order: the very stream the HF export writes, so refit and export cannot diverge;
  4. the pairs are grouped into buckets of bounded bytes, each handed to a `load_weights` (or,
     for vLLM, streamed one pair at a time into its in-place reload).
Beyond the model itself, a rank holds one bucket plus the Megatron tensors of about one layer
(what the mapping keeps while splitting fused tensors): never a full copy.

The parameters are ordered by global layer so that the mapping, which emits in HF order, never
has to hold more than a layer, whatever the pipeline / virtual-pipeline layout.

The parameters are read as they are after `optimizer.step()`: with Megatron's distributed
optimizer that step all-gathers the updated weights. (Were `overlap_param_gather` enabled, that
gather would be deferred into the next forward and a refit would have to finish it first.)
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from opd_megatron.checkpoint.mapping import canonical_megatron_name, megatron_to_hf_tensors
from opd_megatron.models.arch import ModelArch

Pair = tuple[str, torch.Tensor]
DEFAULT_BUCKET_BYTES = 512 * 1024 * 1024

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the global model, as every rank agrees on it."""

    name: str                      # canonical Megatron name with the global layer number
    shape: tuple[int, ...]         # full (TP=1) shape
    dtype: torch.dtype
    owner: int                     # pipeline-parallel rank that holds it
    partition_dim: int | None      # None: replicated over tensor parallelism
    stride: int = 1                # blocks per shard (2 for the gated fc1: [gate_i; up_i])


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside Megatron's DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def global_name(model: torch.nn.Module, local_name: str) -> str:
    """Canonical name with the global (0-based) layer number: a pipeline stage numbers its own
    layers from 0, while `TransformerLayer.layer_number` is global (1-based)."""
    name = canonical_megatron_name(local_name)
    match = _LAYER.match(name)
    if match:
        layer = model.decoder.layers[int(match.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}.{name[match.end():]}"
    return name


def order_key(name: str) -> tuple[int, int]:
    """Embedding, layers by global number, final norm, output layer. Used as a stable sort key, so
    the parameters of one layer keep the model's own order."""
    match = _LAYER.match(name)
    if match:
        return 1, int(match.group(1))
    if name.startswith("embedding."):
        return 0, 0
    return (3 if name.startswith("output_layer.") else 2), 0


def local_parameters(chunks: Sequence[torch.nn.Module], arch: ModelArch,
                     tp_size: int, pp_rank: int) -> list[tuple[ParamSpec, torch.Tensor]]:
    """This rank's parameters that the HF model has, with their global specs."""
    found = []
    for chunk in chunks:
        model = unwrap(chunk)
        for local, param in model.named_parameters():
            name = global_name(model, local)
            # The last stage's copy of a tied embedding: HF has (and vLLM loads) only the original.
            if arch.tie_word_embeddings and name == "output_layer.weight":
                continue
            dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
            shape = list(param.shape)
            if dim is not None:
                shape[dim] *= tp_size
            found.append((ParamSpec(name, tuple(shape), param.dtype, pp_rank, dim,
                                    int(getattr(param, "partition_stride", 1))), param))
    return found


def global_manifest(local_specs: list[ParamSpec], pp_group=None) -> list[ParamSpec]:
    """Every pipeline stage's specs, in global order; identical on every rank of the group."""
    gathered = [local_specs]
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        gathered = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(gathered, local_specs, group=pp_group)
    specs = [spec for stage in gathered for spec in stage]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise RuntimeError(f"parameter {duplicate!r} is held by two pipeline stages")
    return sorted(specs, key=lambda spec: order_key(spec.name))


def merge_tp_shards(shards: Sequence[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from the per-rank shards of a tensor-parallel parameter.

    Megatron splits a strided parameter into world * stride blocks and gives rank r the blocks
    r, r + world, ...: the full tensor is block 0 of every rank, then block 1 of every rank, and so
    on. A gated fc1 (stride 2) thus becomes [gate; up], as at TP=1.
    """
    if stride == 1:
        return torch.cat(list(shards), dim)
    blocks = [shard.chunk(stride, dim) for shard in shards]
    return torch.cat([per_rank[k] for k in range(stride) for per_rank in blocks], dim)


def high_precision(param: torch.Tensor) -> torch.Tensor:
    """The tensor a refit communicates: the parameter itself, in its own dtype.

    Only Transformer Engine's quantized (FP8) primary weights are dequantized, to the high
    precision they stand for (their nominal dtype). `Tensor.dequantize()` on a plain bf16
    tensor would return an fp32 copy: twice the bytes, and a dtype the other pipeline stages
    do not expect in their receive buffers.
    """
    from megatron.core.fp8_utils import dequantize_fp8_tensor, is_float8tensor

    tensor = param.detach()
    return dequantize_fp8_tensor(tensor) if is_float8tensor(tensor) else tensor


def check_tensor(tensor: torch.Tensor, spec: ParamSpec, shape: tuple[int, ...], what: str) -> None:
    """Both sides of a collective must agree on dtype and shape; gloo aborts on a size mismatch
    and NCCL hangs or corrupts memory, so check before communicating."""
    if tensor.dtype != spec.dtype or tuple(tensor.shape) != tuple(shape):
        raise RuntimeError(f"refit {what} of {spec.name}: got {tensor.dtype} "
                           f"{tuple(tensor.shape)}, every rank expects {spec.dtype} {tuple(shape)}")


def gather_full(param: torch.Tensor, spec: ParamSpec, tp_group=None) -> torch.Tensor:
    shard = high_precision(param)
    if spec.partition_dim is None or tp_group is None or dist.get_world_size(tp_group) == 1:
        check_tensor(shard, spec, spec.shape, "tensor")
        return shard
    tp_size = dist.get_world_size(tp_group)
    local_shape = list(spec.shape)
    local_shape[spec.partition_dim] //= tp_size
    check_tensor(shard, spec, tuple(local_shape), "all-gather shard")
    parts = [torch.empty_like(shard) for _ in range(tp_size)]
    dist.all_gather(parts, shard.contiguous(), group=tp_group)
    return merge_tp_shards(parts, spec.partition_dim, spec.stride)


def _default_groups():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()


def _current_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


class MegatronWeights:
    """The full (TP=1) Megatron tensors of the global model, on every rank of a model replica.

    Collective over the tensor- and pipeline-parallel groups: iterate on every rank together.
    """

    def __init__(self, chunks: Sequence[torch.nn.Module], arch: ModelArch, tp_group=None,
                 pp_group=None):
        if tp_group is None and pp_group is None and dist.is_initialized():
            tp_group, pp_group = _default_groups()
        self.tp_group, self.pp_group = tp_group, pp_group
        self.pp_rank = dist.get_rank(pp_group) if pp_group is not None else 0
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        local = local_parameters(chunks, arch, tp_size, self.pp_rank)
        self.params = {spec.name: param for spec, param in local}
        self.manifest = global_manifest([spec for spec, _ in local], pp_group)
        self.arch = arch

    @property
    def padded_vocab(self) -> int:
        embedding = "embedding.word_embeddings.weight"
        return next(spec.shape[0] for spec in self.manifest if spec.name == embedding)

    def __iter__(self) -> Iterator[Pair]:
        multi_stage = self.pp_group is not None and dist.get_world_size(self.pp_group) > 1
        for spec in self.manifest:
            if spec.owner == self.pp_rank:
                full = gather_full(self.params[spec.name], spec, self.tp_group)
            else:
                full = torch.empty(spec.shape, dtype=spec.dtype, device=_current_device())
            if multi_stage:
                check_tensor(full, spec, spec.shape, "pipeline broadcast")
                dist.broadcast(full, src=dist.get_global_rank(self.pp_group, spec.owner),
                               group=self.pp_group)
            yield spec.name, full

    def hf_tensors(self) -> Iterator[Pair]:
        """HF (name, tensor) pairs in HF export order (through the checkpoint mapping)."""
        return megatron_to_hf_tensors(self.arch, iter(self), padded_vocab=self.padded_vocab)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucket_by_bytes(pairs: Iterable[Pair], max_bytes: int) -> Iterator[list[Pair]]:
    """Consecutive groups of `pairs`, each at most `max_bytes`, order kept. A tensor larger than
    `max_bytes` travels alone: a weight loader needs whole tensors."""
    if max_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {max_bytes}")
    bucket: list[Pair] = []
    size = 0
    for name, tensor in pairs:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@dataclass
class RefitStats:
    tensors: int = 0
    bytes: int = 0
    buckets: int = 0
    max_bucket_bytes: int = 0
    seconds: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        return {"refit_seconds": self.seconds, "refit_gib": self.bytes / 2**30,
                "refit_buckets": float(self.buckets)}

    def add(self, bucket: list[Pair]) -> None:
        size = sum(tensor_bytes(t) for _, t in bucket)
        self.tensors += len(bucket)
        self.bytes += size
        self.buckets += 1
        self.max_bucket_bytes = max(self.max_bucket_bytes, size)


def refit_buckets(chunks: Sequence[torch.nn.Module], arch: ModelArch, stats: RefitStats,
                  bucket_bytes: int = DEFAULT_BUCKET_BYTES, tp_group=None,
                  pp_group=None) -> Iterator[list[Pair]]:
    """The student's weights as HF (name, tensor) buckets of at most `bucket_bytes`, counted into
    `stats` as they go. Collective: all ranks of a model replica iterate together."""
    start = time.perf_counter()
    weights = MegatronWeights(chunks, arch, tp_group, pp_group)
    # No autograd here: the tensors are detached copies or views (`gather_full`).
    for bucket in bucket_by_bytes(weights.hf_tensors(), bucket_bytes):
        yield bucket
        stats.add(bucket)
    stats.seconds = time.perf_counter() - start


def refit(load_weights: Callable[[list[Pair]], object], chunks: Sequence[torch.nn.Module],
          arch: ModelArch, bucket_bytes: int = DEFAULT_BUCKET_BYTES, tp_group=None,
          pp_group=None) -> RefitStats:
    """Stream the student's weights, bucket by bucket, into `load_weights`."""
    stats = RefitStats()
    for bucket in refit_buckets(chunks, arch, stats, bucket_bytes, tp_group, pp_group):
        load_weights(bucket)
    return stats


def refit_error_metrics(sampler_logprobs: Sequence[Sequence[float]],
                        trainer_logprobs: Sequence[Sequence[float]]) -> dict[str, float]:
    """How far the rollout engine's log-probs are from the trainer's on the same tokens.

    `gen_kl_error` is the k3 estimate of KL(sampler || trainer) over the sampled tokens,
    mean(exp(d) - d - 1) with d = trainer - sampler: 0 for a perfect refit, ~1e-3 is typical of
    bf16 kernels, and a stale or mis-mapped weight shows up as orders of magnitude more.
    """
    diffs = []
    pairs = zip(sampler_logprobs, trainer_logprobs, strict=True)
    for index, (sampled, trained) in enumerate(pairs):
        if len(sampled) != len(trained):
            raise ValueError(f"sequence {index}: {len(sampled)} sampler log-probs but "
                             f"{len(trained)} trainer log-probs")
        diffs.extend(t - s for s, t in zip(sampled, trained, strict=True))
    if not diffs:
        return {"gen_kl_error": 0.0, "gen_logprob_max_abs_diff": 0.0, "gen_tokens": 0.0}
    return {"gen_kl_error": sum(math.expm1(d) - d for d in diffs) / len(diffs),
            "gen_logprob_max_abs_diff": max(abs(d) for d in diffs),
            "gen_tokens": float(len(diffs))}


def verify_refit(engine, prompts: Sequence[Sequence[int]], sampling,
                 score: Callable[[list], list[Sequence[float]]]) -> dict[str, float]:
    """Sample a few sequences with `engine` (any RolloutEngine) and compare its log-probs with
    `score(rollouts)`: the student's teacher-forced log-probs of each response, at the sampling
    temperature (the stage computes them with the Megatron model)."""
    rollouts = engine.generate(prompts, sampling)
    return refit_error_metrics([r.logprobs for r in rollouts], score(rollouts))
