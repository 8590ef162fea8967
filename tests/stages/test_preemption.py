"""Preemption under torchrun (2 ranks, gloo): a signal to one rank makes every rank finish its
step, checkpoint and exit 0, and the resumed run's losses equal the uninterrupted run's; Ctrl-C
ends every process without a half-written `latest`."""
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from opd_megatron.trainer.checkpointing import latest_checkpoint
from opd_megatron.trainer.metrics import read_metrics
from tests.launch import REPO_ROOT, free_port
from tests.stages.conftest import sft_args, train

STEPS = 12


def start_torchrun(args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "opd_megatron",
           "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
           "PYTHONWARNINGS": "ignore"}
    # Its own session, as a terminal's foreground job: killpg reaches torchrun, not pytest.
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_steps(proc: subprocess.Popen, metrics, steps: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and len(read_metrics(metrics)) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {steps}:\n{proc.communicate()[1][-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {steps} within {timeout} s")


def worker_of_rank(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "opd_megatron" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_to_one_rank_checkpoints_exits_0_and_resumes_exactly(tiny_world, tmp_path,
                                                                    signum):
    full, preempted = tmp_path / "full", tmp_path / "preempted"
    common = {"trainer.steps": STEPS, "trainer.save_every": 0, "trainer.eval_every": 0}
    train(2, *sft_args(tiny_world, full, **common))

    proc = start_torchrun(sft_args(tiny_world, preempted, **common))
    wait_for_steps(proc, preempted / "metrics.jsonl", 2)
    worker_of_rank(proc, 1).send_signal(signum)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    line = next(line for line in stdout.splitlines() if line.startswith("preempted"))
    stopped_at = len(read_metrics(preempted / "metrics.jsonl"))
    assert stopped_at < STEPS
    checkpoint = preempted / "checkpoints" / f"iter_{stopped_at:07d}"
    assert line == (f"preempted by {signum.name} after step {stopped_at}: checkpoint at "
                    f"{checkpoint}; trainer.resume=auto continues from it")
    assert latest_checkpoint(preempted / "checkpoints") == checkpoint

    train(2, *sft_args(tiny_world, preempted, **common))
    resumed = read_metrics(preempted / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in read_metrics(full / "metrics.jsonl")]


def test_ctrl_c_under_torchrun_ends_every_process_and_keeps_latest_whole(tiny_world, tmp_path):
    out = tmp_path / "interrupted"
    proc = start_torchrun(sft_args(tiny_world, out, **{"trainer.steps": 200,
                                                       "trainer.save_every": 1,
                                                       "trainer.keep_last": 2}))
    wait_for_steps(proc, out / "metrics.jsonl", 3)
    family = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)   # what a terminal's Ctrl-C does
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    gone, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, f"orphans: {[(p.pid, p.cmdline()) for p in alive]}"
    latest = out / "checkpoints" / "latest"
    assert latest.is_symlink()
    assert latest.resolve() == latest_checkpoint(out / "checkpoints")
    assert (latest.resolve() / "trainer_state.json").is_file()
