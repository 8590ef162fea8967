"""Primitives over vocabulary-sharded logits, processed in chunks of positions.

Layout (Megatron's): the padded vocabulary of size Vp is split contiguously over the tp ranks, rank
r holds global ids [r * Vp/tp, (r+1) * Vp/tp). Ids >= vocab_size are padding: a shard is used only
up to its `valid` column, so padding never enters a max, a sum, a softmax or a top-K, and its
gradient is zero.

Logits are flattened to [positions, shard width] and visited `chunk` positions at a time, upcast to
the compute dtype (at least fp32) one chunk at a time into reused buffers. Nothing of vocabulary
size crosses ranks: only per-position scalars and K candidates per rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from opd_megatron.losses._comm import all_gather_cat, all_reduce_, group_rank, group_size

# Elements per chunk buffer, per device type: small beside a shard, large enough to amortise the
# per-chunk collectives. CPU: 16 MiB in fp32 (smaller chunks would sit better in cache but pay
# more gloo round trips; not re-tuned). CUDA: 64 MiB, where kernel launches rather than the cache
# bound the chunk (not measured on a GPU here; tools/gpu_check.sh runs the losses on one).
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 24}
# A chunk never spans more than this fraction of the positions, so that the handful of chunk
# buffers stays well under one shard even for a small vocabulary or bf16 inputs (on CPU, glibc's
# heap also keeps freed buffers resident between calls: peak RSS creeps by a few buffer sizes).
MAX_CHUNK_FRACTION = 32


@dataclass(frozen=True)
class VocabShard:
    """Where this rank's columns sit in the global vocabulary."""

    group: object
    width: int  # columns of the local shard, padding included
    start: int  # global id of local column 0
    valid: int  # leading local columns that are real vocabulary
    vocab_size: int  # real (unpadded) global vocabulary size

    @classmethod
    def of(cls, width: int, vocab_size: int | None, group) -> "VocabShard":
        padded = width * group_size(group)
        if vocab_size is None:
            vocab_size = padded
        if not 0 < vocab_size <= padded:
            raise ValueError(f"vocab_size={vocab_size} must be in [1, {padded}] (shard width "
                             f"{width} x {group_size(group)} tensor-parallel ranks)")
        start = group_rank(group) * width
        return cls(group, width, start, min(max(vocab_size - start, 0), width), vocab_size)

    def check_ids(self, name: str, ids: torch.Tensor) -> None:
        """Out-of-range ids would silently read 0 (no rank owns them): refuse them instead."""
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
        if ids.numel() and bool(((ids < 0) | (ids >= self.vocab_size)).any()):
            raise ValueError(f"{name} has ids outside [0, vocab_size={self.vocab_size})")

    def local_ids(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(local column, owned mask) for global `ids`; unowned ids get column 0 (indexable)."""
        local = ids - self.start
        owned = (local >= 0) & (local < self.valid)
        return torch.where(owned, local, 0), owned

    def gather(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x[row, id] for the ids this rank owns, 0 elsewhere: a sum over ranks assembles them."""
        if self.valid == 0:
            return x.new_zeros(ids.shape)
        local, owned = self.local_ids(ids)
        return torch.where(owned, x.gather(1, local), 0.0)

    def scatter_add_(self, x: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
        """x[row, id] += values for the ids this rank owns (a gradient goes to its owner only)."""
        if self.valid == 0:
            return
        local, owned = self.local_ids(ids)
        values = torch.where(owned, values, 0.0).to(x.dtype)
        if x.dtype in (torch.float32, torch.float64):
            x.scatter_add_(1, local, values)
            return
        # On CPU, scatter into a bf16/fp16 tensor converts all of it (~400 ms for 20M entries,
        # against 0.1 ms here): index_put_ writes the entries alone.
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(local)
        x.index_put_((rows, local), values, accumulate=True)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 (the reference tests)."""
    return torch.promote_types(dtype, torch.float32)


def chunk_ranges(num_positions: int, width: int, chunk_size: int | None, device=None):
    """(start, stop) position ranges; chunk_size=None picks one from the device's buffer budget."""
    if chunk_size is None:
        budget = CHUNK_ELEMENTS.get(torch.device(device or "cpu").type, CHUNK_ELEMENTS["cuda"])
        chunk_size = min(budget // max(width, 1),
                         math.ceil(num_positions / MAX_CHUNK_FRACTION))
    chunk_size = max(int(chunk_size), 1)
    return [(s, min(s + chunk_size, num_positions)) for s in range(0, num_positions, chunk_size)]


class Workspace:
    """Named [chunk, columns] buffers reused by every chunk of one pass.

    On CPU, allocating fresh chunk-sized tensors costs more than the arithmetic on them (page
    faults on every new mapping, measured ~10x for a subtraction); with `out=` and in-place ops
    into these buffers the extra memory is a fixed few chunks.
    """

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self._shape, self._dtype, self._device = (rows, cols), dtype, device
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, rows: int) -> torch.Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.empty(self._shape, dtype=self._dtype, device=self._device)
        return self._buffers[name][:rows]

    @classmethod
    def for_chunks(cls, ranges, shard: VocabShard, dtype, device) -> "Workspace":
        return cls(max(stop - start for start, stop in ranges), shard.valid, dtype, device)


def check_temperature(temperature: float) -> float:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return float(temperature)


def load_scaled(rows: torch.Tensor, out: torch.Tensor, temperature: float) -> torch.Tensor:
    """out = rows / temperature in the buffer's dtype (the upcast happens here, per chunk)."""
    out.copy_(rows)
    if temperature != 1.0:
        out.div_(temperature)
    return out


def load_shifted(rows: torch.Tensor, out: torch.Tensor, temperature: float,
                 shift: torch.Tensor) -> torch.Tensor:
    """out = rows / temperature - shift in the buffer's dtype; at temperature 1, one pass."""
    if temperature == 1.0:
        return torch.sub(rows, shift, out=out)
    return load_scaled(rows, out, temperature).sub_(shift)


def row_dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """sum_v a[:, v] * b[:, v], through a scratch buffer instead of a fresh product tensor."""
    return torch.mul(a, b, out=scratch).sum(dim=-1)


def local_max(x: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """[n, 1] maximum over this rank's real columns (-inf where it has none)."""
    if shard.valid == 0:
        return x.new_full((x.shape[0], 1), -math.inf)
    return x.amax(dim=-1, keepdim=True)


def global_max(x: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """[n, 1] maximum over the global vocabulary; detached (it only stabilises exp)."""
    return all_reduce_(local_max(x, shard), shard.group, op=dist.ReduceOp.MAX)


def local_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x.topk(k) along the last dim (values, column ids), through block maxima.

    The blocks holding the top k entries are among the k blocks with the largest maxima (a block
    outside them has k blocks ahead of it, each with an entry above its own maximum). So one
    vectorised max over blocks of the row, then a top-k over k blocks' entries, replaces the
    per-row selection of torch.topk over the whole row (which copies every entry into a scratch
    heap: ~4x slower on CPU for a 76k-column shard). Ties may resolve to other ids of equal value.
    """
    n, width = x.shape
    block = _topk_block(width, k)
    if block is None:
        return x.topk(k, dim=-1)
    whole = width // block * block
    maxima = x[:, :whole].unflatten(-1, (width // block, block)).amax(dim=-1)
    if whole < width:  # the ragged last block
        maxima = torch.cat([maxima, x[:, whole:].amax(dim=-1, keepdim=True)], dim=1)
    blocks = maxima.topk(k, dim=-1).indices
    columns = (blocks[:, :, None] * block + torch.arange(block, device=x.device)).flatten(1)
    real = columns < width
    candidates = x.gather(1, torch.where(real, columns, 0))
    candidates.masked_fill_(~real, -math.inf)
    values, at = candidates.topk(k, dim=-1)
    return values, columns.gather(1, at)


def _topk_block(width: int, k: int) -> int | None:
    """Block size minimising (width / block) + (k * block) selection work; None: plain topk."""
    block = 1 << max(4, round(math.log2(math.sqrt(width / k))))
    return block if width >= 4 * k * block else None


def global_topk(x: torch.Tensor, k: int, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the global vocabulary: (values, global ids), [n, k], sorted descending.

    Each rank contributes its local top-k, so k * tp candidates per position cross ranks; column 0
    of the values is the global maximum. `x` may be in the input dtype (selection needs no
    upcast); the values come back in x's dtype.
    """
    n, local_k = x.shape[0], min(k, shard.valid)
    values = x.new_full((n, k), -math.inf)
    ids = torch.zeros((n, k), dtype=torch.long, device=x.device)
    if local_k > 0:
        top_values, top_ids = local_topk(x, local_k)
        values[:, :local_k] = top_values
        ids[:, :local_k] = top_ids + shard.start
    if group_size(shard.group) > 1:
        # One collective for both: ids (< 2^53) and fp32/fp64 values are exact in fp64.
        packed = all_gather_cat(torch.cat([values.double(), ids.double()], dim=1), shard.group,
                                dim=1).view(n, -1, 2, k)
        values = packed[:, :, 0].reshape(n, -1).to(values.dtype)
        ids = packed[:, :, 1].reshape(n, -1).long()
    if values.shape[1] == k:
        return values, ids
    best = values.topk(k, dim=-1)
    return best.values, ids.gather(1, best.indices)
