"""kill -9 of one rank under torchrun leaves no process behind: megatron-core's checkpoint-writer
helpers (its results Manager and the resource tracker) end with their rank."""
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.launch import REPO_ROOT, free_port
from tests.stages.conftest import sft_args


def tagged_processes(tag: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries `tag`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"OPD_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                status = (proc / "status").read_text()
                if "\nState:\tZ" not in status:
                    found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def rank_pid(tag: str, rank: int) -> int | None:
    for pid, cmd in tagged_processes(tag).items():
        if "opd_megatron" in cmd and "multiprocessing" not in cmd:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return pid
    return None


def test_killing_one_rank_leaves_no_orphans(tiny_world, tmp_path):
    tag = uuid.uuid4().hex
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "opd_megatron",
           "train", *sft_args(tiny_world, out, **{"data.eval_path": "null", "trainer.steps": 200,
                                                  "trainer.save_every": 1, "trainer.keep_last": 1})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
           "PYTHONWARNINGS": "ignore", "OPD_TEST_TAG": tag}
    launcher = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "latest").exists():   # the writer's helpers are up
            assert launcher.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.5)
        helpers = [cmd for cmd in tagged_processes(tag).values() if "multiprocessing" in cmd]
        assert helpers, "expected megatron's writer helper processes to be running"
        victim = rank_pid(tag, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
        deadline = time.time() + 30
        while tagged_processes(tag) and time.time() < deadline:
            time.sleep(0.5)
        assert tagged_processes(tag) == {}
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in tagged_processes(tag):
            os.kill(pid, signal.SIGKILL)
