"""Resume is exact in bf16 too: a run stopped after step k and resumed reproduces the
uninterrupted run's per-step losses and its fp32 main parameters at step 2k bit for bit (SFT and
OPD, DP=2 with the distributed optimizer).

The fp32 main parameters live in the optimizer checkpoint. Resuming used to copy the bf16 model
weights over them (megatron's `reload_model_params`), dropping every update below one bf16 ulp;
and a bf16 run started from a checkpoint kept its random main parameters.
"""
import shutil

import pytest
import torch

from opd_megatron.trainer.metrics import read_metrics
from tests.launch import torchrun
from tests.stages.conftest import make_checkpoint, stage_overrides, train

K = 2


def run_args(tiny_world, stage, out, teacher=None, **extra):
    root, data = tiny_world
    values = {"precision.precision": "bf16", "trainer.steps": 2 * K, "trainer.save_every": 0,
              "trainer.eval_every": 0, "optimizer.warmup_steps": 1, **extra}
    if stage == "sft":
        values.update({"data.train_path": data["sft"]})
        recipe = "conf/sft_tiny_cpu_tp1.yaml"
    else:
        values.update({"data.train_path": data["train"], "teacher.megatron_dir": str(teacher),
                       "trainer.global_batch_size": 8, "trainer.micro_batch_size": 4})
        recipe = "conf/opd_tiny_cpu_tp1.yaml"
    return ["--config", recipe, *stage_overrides(root, data, out, **values)]


def main_params(*checkpoints, tmp_path) -> list[list[torch.Tensor]]:
    """Each checkpoint's fp32 main parameters, as the distributed optimizer loads them."""
    out = tmp_path / "main_params.pt"
    torchrun("tests/stages/workers/main_params_worker.py", 1, str(out), *map(str, checkpoints))
    loaded = torch.load(out)
    return [loaded[str(ckpt)] for ckpt in checkpoints]


@pytest.fixture(scope="module")
def teacher(tiny_world, tmp_path_factory):
    root, _ = tiny_world
    path = make_checkpoint(tmp_path_factory.mktemp("teacher") / "teacher", seed=7)
    shutil.copy(root / "student" / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.mark.parametrize("stage", ["sft", "opd"])
def test_bf16_resume_is_bit_identical_at_dp2(tiny_world, teacher, tmp_path, stage):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(2, *run_args(tiny_world, stage, full, teacher))
    train(2, *run_args(tiny_world, stage, resumed, teacher, **{"trainer.exit_interval": K}))
    assert (resumed / "checkpoints" / f"iter_{K:07d}").is_dir()
    train(2, *run_args(tiny_world, stage, resumed, teacher))

    full_rows, resumed_rows = read_metrics(full / "metrics.jsonl"), \
        read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in resumed_rows] == list(range(1, 2 * K + 1))
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in full_rows]
    assert [r["grad_norm"] for r in resumed_rows] == [r["grad_norm"] for r in full_rows]

    last = f"iter_{2 * K:07d}"
    expected, got = main_params(full / "checkpoints" / last, resumed / "checkpoints" / last,
                                tmp_path=tmp_path)
    assert len(expected) == len(got) > 0
    assert all(e.dtype == torch.float32 for e in expected)
    assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))
    # The fp32 main parameters are not the bf16 weights: there is sub-ulp state to lose.
    assert not all(torch.equal(e, e.bfloat16().float()) for e in expected)
