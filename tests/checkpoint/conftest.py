"""Session fixtures: tiny HF checkpoints, their HF -> Megatron -> HF conversions (one subprocess)
and transformers' reference scores."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.checkpoint.tiny_models import MODELS, build, reference_scores
from tests.launch import REPO_ROOT, last_json, torchrun

# 12 positions; ids near both ends of the smallest vocabulary (250).
SCORE_IDS = [1, 17, 249, 3, 120, 77, 200, 5, 64, 0, 248, 31]


def run_python(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a worker in its own process (Megatron's CPU patches must not reach pytest's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed with rc={proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n"
                             f"--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict:
    """name -> HF checkpoint dir (the first one also carries a tokenizer)."""
    from opd_megatron.data.tiny_tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("hf")
    tokenizer = build_tiny_tokenizer(root / "tokenizer")
    return {m.name: build(m, root / m.name, seed=i, tokenizer_dir=tokenizer if i == 0 else None)
            for i, m in enumerate(MODELS)}


@pytest.fixture(scope="session")
def converted(tiny_hf, tmp_path_factory) -> dict:
    """name -> {"hf", "megatron", "hf_out", "padding_max"} after HF -> Megatron -> HF."""
    root = tmp_path_factory.mktemp("converted")
    jobs = {name: {"hf": str(d), "megatron": str(root / name / "megatron"),
                   "hf_out": str(root / name / "hf")} for name, d in tiny_hf.items()}
    # One conversion overwrites an existing output directory (--force).
    stale = root / "llama3" / "megatron"
    stale.mkdir(parents=True)
    (stale / "stale.txt").write_text("from an earlier run")
    jobs["llama3"]["force"] = True
    jobs["qwen3"]["fsync"] = True  # the durable path gives the same output
    (root / "jobs.json").write_text(json.dumps(jobs))
    report = last_json(run_python("tests/checkpoint/workers/convert_worker.py",
                                  str(root / "jobs.json")).stdout)
    return {name: {**job, **report[name]} for name, job in jobs.items()}


@pytest.fixture(scope="session")
def resaved_exports(converted, tmp_path_factory) -> dict:
    """name -> HF export of the checkpoint after a TP2xPP2 load-and-save (vocab padded to 512)."""
    root = tmp_path_factory.mktemp("resaved")
    names = ["llama3", "qwen2"]  # untied GQA; tied with QKV bias
    torchrun("tests/checkpoint/workers/resave_worker.py", 4, "2", "2",
             *[f"{converted[n]['megatron']}:{root / n / 'megatron'}" for n in names])
    jobs = {n: {"megatron": str(root / n / "megatron"), "hf_out": str(root / n / "hf")}
            for n in names}
    (root / "jobs.json").write_text(json.dumps(jobs))
    run_python("tests/checkpoint/workers/convert_worker.py", str(root / "jobs.json"))
    return {n: job["hf_out"] for n, job in jobs.items()}


@pytest.fixture(scope="session")
def references(tiny_hf) -> dict:
    return {name: reference_scores(d, SCORE_IDS) for name, d in tiny_hf.items()}
