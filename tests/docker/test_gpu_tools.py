"""The GPU tools the image ships (tools/quantize_fp8.py, tools/gpu_check.{sh,py}): their CPU-side
behaviour here; the GPU rows themselves run on a lent GPU (`tools/gpu_check.sh`)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quantize_fp8 = _load("quantize_fp8")


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*args], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def test_quantize_without_cuda_is_one_clear_line(tmp_path):
    proc = _run(sys.executable, "tools/quantize_fp8.py", "--hf-dir", str(tmp_path),
                "--out", str(tmp_path / "out"), "--calib-data", str(tmp_path / "p.jsonl"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: FP8 quantization needs a CUDA GPU and none is visible "
        "(torch.cuda.is_available() is False)"]


def test_quantize_without_modelopt_names_the_package(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "modelopt", None)
    with pytest.raises(quantize_fp8.ToolError, match="needs nvidia-modelopt") as info:
        quantize_fp8.check_gpu_stack()
    assert "\n" not in str(info.value)


def test_calibration_rows_are_the_projects_prompt_rows(tmp_path):
    path = tmp_path / "calib.jsonl"
    rows = [{"prompt": "2+2?", "answer": "4"},
            {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": "hi"}]},
            {"text": "raw text"}, {"prompt": "not read: past --num-calib"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    render = lambda messages: "|".join(f"{m['role']}:{m['content']}" for m in messages)  # noqa: E731
    assert quantize_fp8.calibration_texts(path, 3, render) == [
        "user:2+2?", "system:be brief|user:hi", "raw text"]
    assert len(quantize_fp8.calibration_texts(path, 100, render)) == 4


@pytest.mark.parametrize("line,message", [("{bad", ":1: invalid JSON"),
                                          ('{"answer": "4"}', ":1: a row needs 'prompt'")])
def test_bad_calibration_rows_name_the_line(tmp_path, line, message):
    path = tmp_path / "calib.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(quantize_fp8.ToolError, match=message):
        quantize_fp8.calibration_texts(path, 10, str)


def test_gpu_check_script_lint_and_missing_gpu(tmp_path):
    subprocess.run(["bash", "-n", str(TOOLS / "gpu_check.sh")], check=True)
    if shutil.which("shellcheck"):
        lint = _run("shellcheck", "tools/gpu_check.sh")
        assert lint.returncode == 0, lint.stdout
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/usr/bin/env bash\nexit 9\n")
    fake.chmod(0o755)
    proc = _run("bash", "tools/gpu_check.sh", env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert proc.returncode == 2 and "no NVIDIA GPU visible" in proc.stderr


def test_gpu_check_loss_rows_run_on_cpu():
    """The loss rows' code, on CPU: fp32 against the float64 reference; rows are numbered."""
    from opd_megatron.losses import LOSSES

    proc = _run(sys.executable, "tools/gpu_check.py", "--device", "cpu",
                "--only", "environment,losses,opd,fp8train,eval,refit,memory,export")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[:2] == ["| # | check | status | detail | s |", "|---|---|---|---|---|"]
    cells = [line.strip("| ").split(" | ") for line in lines[2:]]
    assert [int(c[0]) for c in cells] == list(range(1, len(cells) + 1))
    rows = {c[1]: c[2] for c in cells}
    gpu_only = ("opd step", "fp8 train", "opd eval", "refit after train", "memory", "fp8 export")
    assert rows == {"environment": "pass", **{f"loss {name}": "pass" for name in LOSSES},
                    **{name: "skip" for name in gpu_only}}


def test_gpu_check_fails_with_the_failing_rows_number(monkeypatch, capsys):
    gpu_check = _load("gpu_check")

    def broken(device, loss):
        def check():
            raise RuntimeError(f"{loss} is off")
        return check

    monkeypatch.setattr(gpu_check, "loss_check", broken)
    assert gpu_check.main(["--device", "cpu", "--only", "environment,losses"]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2].startswith("| 1 | environment | pass |")
    assert lines[3].startswith("| 2 | loss ") and "| fail | RuntimeError:" in lines[3]


def test_gpu_check_groups_cover_the_issue_rows():
    gpu_check = _load("gpu_check")
    assert {"checkpoint", "fp8train", "eval", "refit", "memory", "export"} <= set(gpu_check.GROUPS)
    assert "timeout --kill-after=10 590" in (TOOLS / "gpu_check.sh").read_text()


def test_gpu_check_refuses_unknown_groups():
    proc = _run(sys.executable, "tools/gpu_check.py", "--device", "cpu", "--only", "losses,bogus")
    assert proc.returncode == 2 and "unknown groups: bogus" in proc.stderr
