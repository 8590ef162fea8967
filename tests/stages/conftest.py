"""A tiny random Megatron checkpoint and synthetic addition data, shared by the stage tests."""
import json
import subprocess
import sys

import pytest

from opd_megatron.data.synthetic import addition_problems, prompt_rows, sft_rows, write_jsonl
from tests.launch import REPO_ROOT, last_json, torchrun

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}


def make_checkpoint(out, shape=TINY, seed=1, zero=False):
    proc = subprocess.run(
        [sys.executable, "tests/stages/workers/make_tiny_checkpoint.py", str(out),
         json.dumps(shape), str(seed), *(["zero"] if zero else [])],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    make_checkpoint(root / "student")
    # One-digit sums are a lookup table: accuracy is measured on training prompts.
    train = addition_problems(100, digits=1, seed=0)
    held_out = train[:48]
    data = {
        "sft": write_jsonl(sft_rows(train), root / "sft.jsonl"),
        "train": write_jsonl(prompt_rows(train), root / "train.jsonl"),
        "eval": write_jsonl(prompt_rows(held_out), root / "eval.jsonl"),
        "rule": write_jsonl(prompt_rows(train, rule=True), root / "rule.jsonl"),
    }
    return root, data


def stage_overrides(root, data, out, **extra):
    values = {"model.megatron_dir": str(root / "student"), "data.eval_path": str(data["eval"]),
              "output_dir": str(out), "trainer.tensorboard": "false", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def train(nproc, *overrides):
    """`python -m opd_megatron train` on `nproc` ranks; fails the test with its output."""
    if nproc == 1:
        proc = subprocess.run([sys.executable, "-m", "opd_megatron", "train", *overrides],
                              capture_output=True, text=True, cwd=REPO_ROOT, timeout=900)
        assert proc.returncode == 0, proc.stderr[-5000:]
        return proc
    return torchrun("opd_megatron", nproc, "train", *overrides, module=True, timeout=900)


def sft_args(tiny_world, out, **extra):
    root, data = tiny_world
    return ["--config", "conf/sft_tiny_cpu_tp1.yaml",
            *stage_overrides(root, data, out, **{"data.train_path": data["sft"], **extra})]


@pytest.fixture(scope="session")
def sft_run(tiny_world, tmp_path_factory):
    """The tiny student after SFT (150 steps), with accuracy measured before and after."""
    out = tmp_path_factory.mktemp("sft_tp1")
    result = last_json(train(1, *sft_args(tiny_world, out, **{
        "trainer.steps": 150, "trainer.eval_every": 150, "eval.num_examples": 48})).stdout)
    return out, result
