"""Run a worker script under torchrun (gloo on CPU) from a test.

Megatron tests run in subprocesses: the CPU compatibility layer patches the whole process,
and every parallel layout needs several ranks anyway.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 600,
             env: dict[str, str] | None = None, module: bool = False) -> subprocess.CompletedProcess:
    """Launch `script` (a module name with module=True) on `nproc` local ranks; fail the test
    with the ranks' output on error."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           *(["-m"] if module else []), str(script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
                "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} (nproc={nproc}) failed with rc={proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


def last_json(stdout: str):
    """The last line of `stdout` that parses as JSON (workers print results that way)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON line in output:\n{stdout[-4000:]}")
