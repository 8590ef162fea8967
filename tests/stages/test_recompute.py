"""Activation recompute changes memory, not numbers: SFT steps with `trainer.recompute: full`
follow the losses of a run that keeps every activation."""
import pytest

from opd_megatron.trainer.metrics import read_metrics
from tests.stages.conftest import sft_args, train


def test_recompute_keeps_the_loss_curve(tiny_world, tmp_path):
    losses = {}
    for mode in ("none", "full"):
        out = tmp_path / mode
        train(1, *sft_args(tiny_world, out, **{"trainer.steps": 3, "trainer.recompute": mode,
                                                "trainer.eval_every": 0}))
        losses[mode] = [h["loss"] for h in read_metrics(out / "metrics.jsonl") if "loss" in h]
    assert len(losses["none"]) == 3
    assert losses["full"] == pytest.approx(losses["none"], rel=1e-6)
