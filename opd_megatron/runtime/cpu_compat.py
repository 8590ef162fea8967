"""Run megatron-core on CPU with gloo: the compatibility layer (see docs/DESIGN.md).

megatron-core assumes CUDA in a handful of places: tensors created with ``device="cuda"``,
``.cuda()`` calls, ``torch.cuda.current_device()``, the CUDA RNG tracker and a type assertion in
gradient clipping. This module answers all of them from one place, and only when CUDA is absent.
It is written against one megatron-core release; `check_megatron_version` fails loudly on another,
because each of these patches relies on that release's internals.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

SUPPORTED_MEGATRON_CORE = "0.16.1"
_CPU = torch.device("cpu")
_active_mode: "_CudaToCpuMode | None" = None


def check_megatron_version() -> None:
    from megatron.core import package_info

    if package_info.__version__ != SUPPORTED_MEGATRON_CORE:
        raise RuntimeError(
            f"opd_megatron.runtime.cpu_compat was written for megatron-core=={SUPPORTED_MEGATRON_CORE}"
            f", found {package_info.__version__}: re-validate every patch in this module first")


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare integer device means a CUDA ordinal to torch.
    return isinstance(device, int) and not isinstance(device, bool)


def _rewrite_device_kwarg(kwargs: dict) -> None:
    if "device" in kwargs and _is_cuda(kwargs["device"]):
        kwargs["device"] = _CPU


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites every request for a CUDA tensor into a CPU one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads asserts grad.type() == "torch.cuda.FloatTensor".
            return func(*args).replace("torch.", "torch.cuda.", 1)
        _rewrite_device_kwarg(kwargs)
        if func in (torch.Tensor.to, torch.Tensor.new_empty, torch.Tensor.new_zeros,
                    torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.new_tensor):
            args = tuple(_CPU if _is_cuda(a) and not isinstance(a, int) else a for a in args)
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """The CUDA RNG tracker's interface (add / fork / get_states / set_states) over the CPU generator."""

    def __init__(self, *_, **__):
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    mp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def activate() -> bool:
    """Install the layer in this process when CUDA is absent; returns whether it is active.

    Idempotent. Never activates on a machine with CUDA: there megatron-core runs unmodified.
    """
    global _active_mode
    if torch.cuda.is_available():
        return False
    if _active_mode is not None:
        return True
    check_megatron_version()
    _patch_torch_cuda()
    _patch_megatron()
    _active_mode = _CudaToCpuMode()
    _active_mode.__enter__()
    return True


def is_active() -> bool:
    return _active_mode is not None
