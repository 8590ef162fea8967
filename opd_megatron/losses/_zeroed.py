"""A zero tensor whose pages are written only where something is stored (calloc semantics).

A gradient that lives on K entries per row of a vocabulary shard is zero almost everywhere. On
CPU, torch.zeros faults in and writes every page of it, which costs more than all the arithmetic
of a support-only loss (measured ~1 ms per MB on a VM, the fault rather than the memset). A fresh
anonymous mapping is zero-filled by the kernel page by page on first touch, as numpy.zeros gets
from calloc, so the scatter of the support entries touches only the pages it writes and readers
of the rest see the shared zero page. On accelerators torch.zeros is a device memset and is kept.
"""
from __future__ import annotations

import math
import mmap

import torch

# Below this a mapping's fault-in saving is nothing next to its system calls; malloc reuses heap.
MIN_MAPPED_BYTES = 1 << 20


def zeros_untouched(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < MIN_MAPPED_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    # The tensor keeps the mapping alive; it is unmapped when the tensor's storage is freed.
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)
