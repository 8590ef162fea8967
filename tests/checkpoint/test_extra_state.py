"""Checkpoints written on the CPU load into Transformer Engine models: only `*._extra_state`
entries (TE's FP8 scaling state, which the local layer spec has none of) may be missing."""
from tests.launch import REPO_ROOT, last_json, torchrun


def test_missing_extra_state_is_tolerated_and_nothing_else(tmp_path):
    proc = torchrun(REPO_ROOT / "tests/checkpoint/workers/extra_state_worker.py", 1, str(tmp_path))
    result = last_json(proc.stdout)
    assert result["extra_state"] is True
    message = result["missing_weight"]
    assert "keys the model has and the checkpoint lacks: decoder.final_layernorm.bias" in message
    assert "\n" not in message
