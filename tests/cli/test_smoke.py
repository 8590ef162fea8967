"""The smoke command: validates before any process group, trains at TP=1 and TP=2."""
import subprocess
import sys

from tests.launch import REPO_ROOT, last_json, torchrun


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "opd_megatron", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)


def test_bad_layout_fails_before_process_groups_with_one_line():
    out = run_cli("smoke", "--config", "conf/smoke_tiny.yaml", "parallel.tensor_parallel=3")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == ["error: conf/smoke_tiny.yaml: parallel.tensor_parallel=3 does not divide "
                     "the model's num_attention_heads=4"]


def test_fp8_on_cpu_is_a_clear_error():
    out = run_cli("smoke", "--config", "conf/smoke_tiny.yaml", "precision.precision=fp8")
    assert out.returncode == 2
    assert "precision.precision=fp8 needs a CUDA GPU" in out.stderr


def test_smoke_trains_single_process():
    out = run_cli("smoke", "--config", "conf/smoke_tiny.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    result = last_json(out.stdout)
    assert result["last_loss"] < result["first_loss"] - 0.5


def test_smoke_trains_at_tp2():
    out = torchrun("opd_megatron", 2, "smoke", "--config", "conf/smoke_tiny.yaml",
                   "parallel.tensor_parallel=2", module=True)
    result = last_json(out.stdout)
    assert result["last_loss"] < result["first_loss"] - 0.5
