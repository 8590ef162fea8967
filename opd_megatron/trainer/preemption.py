"""Save and exit when the scheduler warns: SLURM's `--signal`, Kubernetes' SIGTERM, a user's kill.

A handler only records the signal; the trainer loop asks, once per step and on every rank
together, whether any rank received one (`agreed`), so that all ranks finish the same step, write
one checkpoint and leave. Waiting for the step to end is what makes the checkpoint exact: a signal
mid-step must not interrupt a collective on some ranks only.
"""
from __future__ import annotations

import signal
from typing import Sequence

import torch

UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def signal_number(name: str) -> int:
    """`SIGTERM` -> 15; ValueError naming the problem for anything that cannot be caught."""
    if name in UNCATCHABLE:
        raise ValueError(f"{name} cannot be caught")
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"{name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)") from None


class PreemptionWatch:
    """Context manager: records the signals in `names` while training runs, restores the
    previous handlers on exit."""

    def __init__(self, names: Sequence[str]):
        self.numbers = [signal_number(name) for name in names]
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionWatch":
        for number in self.numbers:
            self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _record(self, number: int, frame) -> None:
        self.received = number

    def agreed(self) -> str | None:
        """Collective over the world: the name of a signal some rank received, the same on
        every rank, or None to carry on."""
        from opd_megatron.runtime.distributed import current_device

        flag = torch.tensor([self.received], dtype=torch.int64, device=current_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return signal.Signals(int(flag.item())).name if flag.item() else None
