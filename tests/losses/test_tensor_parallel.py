"""Every loss at TP=2 and TP=4 (gloo, torchrun) against the float64 reference on the full logits.

One launch per TP size; the worker loops over all loss x support x dtype combinations, the
log-probs, GRPO and SFT, and the default (megatron) group resolution.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from opd_megatron.losses import LOSSES
from tests.launch import last_json, torchrun

WORKER = Path(__file__).parent / "workers" / "tp_worker.py"


@pytest.mark.parametrize("tp", [2, 4])
def test_losses_match_reference_under_tensor_parallelism(tp):
    report = last_json(torchrun(WORKER, tp, timeout=300).stdout)
    assert report["world"] == tp
    too_large = {name: err for name, err in report["errors"].items()
                 if err > report["tolerance"].get(name.split("/")[0], 0.0)}
    assert not too_large, too_large
    # Per dtype: every loss x support with and without metrics, log-probs, GRPO x 2, SFT.
    assert len(report["errors"]) == 2 * (len(LOSSES) * 3 * 2 + 4) + 1
