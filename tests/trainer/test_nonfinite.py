"""A finite loss with an inf gradient on one rank skips the update on every rank (bf16, gloo).

Without a loss scaler megatron checks no gradient: `clip_grad_by_total_norm_fp32` leaves a
NaN-norm gradient as it is and Adam writes NaN into the weights. The engine now refuses any step
whose global gradient norm is not finite.
"""
import math

import pytest

from tests.launch import last_json, torchrun

WORKER = "tests/trainer/workers/nonfinite_worker.py"


@pytest.mark.parametrize("tp,dp", [(2, 1), (1, 2)], ids=["tp2", "dp2"])
def test_inf_gradient_on_one_rank_skips_the_step_everywhere(tp, dp):
    reports = last_json(torchrun(WORKER, tp * dp, str(tp)).stdout)
    assert len(reports) == tp * dp
    for report in reports:
        clean, poisoned, after = report["steps"]
        assert clean["update_applied"] and clean["moved"] and clean["skipped_nonfinite"] == 0
        # The poisoned step: finite loss, non-finite norm, nothing applied, nothing scheduled.
        assert poisoned["finite_loss"]
        assert not math.isfinite(poisoned["grad_norm"])
        assert poisoned["skipped_nonfinite"] == 1 and not poisoned["update_applied"]
        assert not poisoned["moved"] and poisoned["finite_weights"]
        assert poisoned["lr_schedule_step"] == clean["lr_schedule_step"]
        # Training goes on from the same weights.
        assert after["update_applied"] and after["moved"] and after["finite_weights"]
        assert math.isfinite(after["grad_norm"])
