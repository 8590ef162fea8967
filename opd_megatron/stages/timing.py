"""Wall-clock seconds per phase of a training step, so every metrics row says where its time went.

Stages and the loop wrap their phases in `phase(name)`; the loop takes the totals once per step.
Times are host wall time: each phase ends in a host synchronisation already (sampled tokens,
gradient norm, checkpoint files), so queued GPU work is charged to the phase that launched it.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

# generate: rollout sampling; refit: pushing new weights into the rollout engine; reward:
# verifiers; teacher: teacher forward passes (OPD/OPSD); reference: other forward-only passes
# (GRPO's KL reference, the trainer's old log-probs for TIS); train: the optimizer steps.
PHASES = ("generate", "refit", "reward", "teacher", "reference", "train", "eval", "checkpoint")


class PhaseTimer:
    def __init__(self):
        self._seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        begin = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - begin

    def take(self) -> dict[str, float]:
        """`time/<phase>` seconds since the last call, for every phase (0 for phases not run)."""
        out = {f"time/{name}": self._seconds.get(name, 0.0) for name in PHASES}
        self._seconds.clear()
        return out


# One timer per process: the loop and the stage it runs share it.
TIMER = PhaseTimer()
phase = TIMER.phase
