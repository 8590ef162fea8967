"""Tensors mapped from a region of a checkpoint file: zero-copy reads from the page cache.

A conversion reads every byte once and writes it once. Reading into freshly allocated memory adds
a copy and a page fault per 4 KiB (on a virtual machine whose host reclaims freed memory, the
faults cost more than the copies); a mapped tensor is the page cache itself. Each tensor has its
own mapping, so its pages leave the process's resident set when it is freed, or at once with
`release` while something (torch's checkpoint writer) still holds a reference to it.

The mappings are private (copy-on-write): writing into a mapped tensor never changes the file.
"""
from __future__ import annotations

import math
import mmap
import os
from dataclasses import dataclass

import torch


@dataclass
class MappedTensor:
    tensor: torch.Tensor
    _region: mmap.mmap

    def release(self) -> None:
        """Drop the mapped pages from this process (the tensor stays valid: a later read maps the
        page cache again)."""
        self._region.madvise(mmap.MADV_DONTNEED)


def map_tensor(path: str | os.PathLike, offset: int, dtype: torch.dtype,
               shape: tuple[int, ...]) -> MappedTensor:
    """The tensor of `dtype` and `shape` stored at byte `offset` of the file at `path`.

    The caller checks that the file holds the whole region (a mapping past the end of a file
    faults on access instead of raising).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as f:
        region = mmap.mmap(f.fileno(), max(offset + nbytes - start, 1), offset=start,
                           access=mmap.ACCESS_COPY)
    flat = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset - start) \
        if nbytes else torch.empty(0, dtype=torch.uint8)
    return MappedTensor(flat.view(dtype).view(shape), region)
