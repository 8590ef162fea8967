"""Process groups and seeds: torch.distributed (nccl on GPU, gloo on CPU) and Megatron parallel state."""
from __future__ import annotations

import os
import random
import sys
from datetime import timedelta

import numpy as np
import torch

from opd_megatron.config.schema import ParallelConfig
from opd_megatron.runtime import cpu_compat


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(parallel: ParallelConfig, seed: int, timeout_minutes: int = 30) -> None:
    """Start torch.distributed and Megatron's TP/PP/CP/EP/DP groups, then seed every RNG.

    Works with or without torchrun: a single process without the env:// variables gets a
    one-rank group on a free local port.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    cuda = torch.cuda.is_available()
    if not cuda:
        cpu_compat.activate()
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo",
                                             timeout=timedelta(minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_parallel,
        pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_parallel,
        context_parallel_size=parallel.context_parallel,
        expert_model_parallel_size=parallel.expert_parallel,
    )
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    vllm_groups = sys.modules.get("vllm.distributed.parallel_state")
    if vllm_groups is not None:
        # A colocated vLLM engine built its groups on this process group: they go first (vLLM
        # tears them down at exit otherwise, and fails on a default group already destroyed).
        vllm_groups.destroy_model_parallel()
        vllm_groups.destroy_distributed_environment()   # the default group with them
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def current_device() -> torch.device:
    """Where this rank's tensors live: its GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
