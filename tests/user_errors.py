"""Run a command the way a user does and check the one-line error contract: exit code 2 and
stderr exactly one line `error: ...` (no traceback)."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.launch import REPO_ROOT


def run_command(*args: str, cwd=REPO_ROOT, script: str | None = None) -> subprocess.CompletedProcess:
    """`python -m opd_megatron ARGS` (or `python SCRIPT ARGS`), library warnings silenced."""
    cmd = [sys.executable, *([script] if script else ["-m", "opd_megatron"]), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
           "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error message (after `error: `) of a run that failed as a user error should."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
        f"rc={proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return lines[0][len("error: "):]


def succeeded(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
