"""Reward calls in worker processes, each cut off at a per-call timeout.

A verifier can hang (math-verify on adversarial strings: its own alarms only work in a main
thread and do not cover every path), and a hung call must not hang the run. Each worker serves
one call at a time over a pipe; the parent knows when every call started, and a call past its
timeout gets its worker killed and replaced. Workers are spawned (never forked from a process
holding CUDA or communicator threads) and import the reward plug-ins themselves.
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Sequence

# Workers import the reward (math-verify pulls in sympy) before taking calls; that is not a call.
STARTUP_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class CallResult:
    score: float | None
    error: str | None = None      # "<ExceptionType>: message", or a timeout / dead worker
    timed_out: bool = False


def _serve(conn, name: str, options: dict[str, Any], plugins: Sequence[str]) -> None:
    for module in plugins:
        importlib.import_module(module)
    from opd_megatron.rewards.registry import get_reward

    fn = get_reward(name, **options)
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except EOFError:          # the trainer exited
            return
        if job is None:
            return
        response, example = job
        try:
            conn.send(CallResult(float(fn(response, example))))
        except Exception as e:  # noqa: BLE001 - a verifier's failure is data, reported upstream
            conn.send(CallResult(None, f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, name, options, plugins):
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, name, options, plugins),
                                       daemon=True)
        self.process.start()
        child.close()
        self.job: tuple[int, float] | None = None     # (call index, start time)

    def wait_ready(self) -> None:
        if not self.conn.poll(STARTUP_TIMEOUT_SECONDS):
            self.kill()
            raise RuntimeError(f"reward worker did not start in {STARTUP_TIMEOUT_SECONDS:.0f} s")
        message = self.conn.recv()
        if message != "ready":
            raise RuntimeError(f"reward worker failed to start: {message}")

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class RewardPool:
    """`map(responses, examples)` -> one `CallResult` per response, in order."""

    def __init__(self, name: str, options: dict[str, Any], plugins: Sequence[str] = (), *,
                 workers: int = 2, timeout: float = 10.0):
        if workers < 1 or timeout <= 0:
            raise ValueError(f"reward pool needs workers >= 1 and timeout > 0 "
                             f"(got {workers}, {timeout})")
        self._spec = (name, dict(options), tuple(plugins))
        self.size, self.timeout = workers, timeout
        self._workers: list[_Worker] = []

    def _spawn(self) -> _Worker:
        worker = _Worker(*self._spec)
        worker.wait_ready()
        return worker

    def map(self, responses: Sequence[str], examples: Sequence) -> list[CallResult]:
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())
        pending = deque(enumerate(zip(responses, examples)))
        results: list[CallResult | None] = [None] * len(pending)
        while pending or any(w.job for w in self._workers):
            for worker in self._workers:
                if worker.job is None and pending:
                    index, job = pending.popleft()
                    worker.conn.send(job)
                    worker.job = (index, time.monotonic())
            busy = [w for w in self._workers if w.job]
            next_deadline = min(w.job[1] for w in busy) + self.timeout
            ready = wait([w.conn for w in busy], timeout=max(0.0, next_deadline - time.monotonic()))
            for worker in busy:
                index, started = worker.job
                if worker.conn in ready:
                    try:
                        results[index] = worker.conn.recv()
                        worker.job = None
                        continue
                    except EOFError:
                        results[index] = CallResult(None, "the reward worker died")
                elif time.monotonic() - started >= self.timeout:
                    results[index] = CallResult(None, f"timed out after {self.timeout:g} s",
                                                timed_out=True)
                else:
                    continue
                self._replace(worker)
        return results

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
        self._workers = []
