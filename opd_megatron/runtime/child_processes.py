"""Helper processes that must end with the rank that started them.

megatron-core's torch_dist writer keeps its results queue in a multiprocessing Manager
(filesystem_async._get_write_results_queue: a spawned server process, which also keeps
multiprocessing's resource tracker alive). When a rank is killed (kill -9, OOM killer), both
outlive it as orphans. Starting that Manager ourselves, with the kernel's parent-death signal set
in it, makes it die with its rank; the resource tracker then sees its last client gone and exits.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1
_manager: SyncManager | None = None


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:     # the parent died before the signal was armed
        os._exit(0)


def bind_checkpoint_writer_to_rank() -> None:
    """Give megatron's async-save results queue a Manager that dies with this process (Linux;
    elsewhere megatron starts its own on first save)."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not sys.platform.startswith("linux") or filesystem_async._results_queue is not None:
        return
    _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    _manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()
