"""`score` at TP1, TP2, PP2 and TP2xPP2 matches transformers (fp32, eager) on every architecture.

Each layout is one torchrun launch that scores every converted checkpoint.
"""
import subprocess
import sys

import pytest
import torch

from tests.checkpoint.conftest import SCORE_IDS
from tests.checkpoint.tiny_models import MODELS
from tests.launch import REPO_ROOT, last_json, torchrun

WORKER = "tests/checkpoint/workers/score_worker.py"
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2pp2": (2, 2)}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def scored(request, converted):
    tp, pp = LAYOUTS[request.param]
    dirs = [converted[m.name]["megatron"] for m in MODELS]
    out = torchrun(WORKER, tp * pp, str(tp), str(pp), ",".join(map(str, SCORE_IDS)), *dirs)
    results = last_json(out.stdout)
    return tp, {m.name: results[converted[m.name]["megatron"]] for m in MODELS}


@pytest.mark.parametrize("name", [m.name for m in MODELS])
def test_matches_transformers(scored, references, name):
    tp, results = scored
    model = next(m for m in MODELS if m.name == name)
    if model.num_kv_heads % tp:
        # validate_layout refuses TP that does not divide the KV heads, in one line.
        assert "does not divide the model's num_key_value_heads=1" in results[name]["error"]
        return
    ref = references[name]
    logprobs = torch.tensor(results[name]["logprobs"])
    assert logprobs.shape == ref["logprobs"].shape
    assert (logprobs - ref["logprobs"]).abs().max() < 1e-4
    assert results[name]["argmax"] == ref["argmax"].tolist()


def test_cli_prints_one_json_object(converted, references):
    out = subprocess.run([sys.executable, "-m", "opd_megatron", "score", "--megatron-dir",
                          converted["qwen2"]["megatron"], "--input-ids",
                          ",".join(map(str, SCORE_IDS)), "--json"],
                         capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = last_json(out.stdout)
    assert len(result["logprobs"]) == len(SCORE_IDS) - 1
    assert (torch.tensor(result["logprobs"]) - references["qwen2"]["logprobs"]).abs().max() < 1e-4
    assert result["argmax"] == references["qwen2"]["argmax"].tolist()
