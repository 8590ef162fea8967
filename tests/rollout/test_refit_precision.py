"""Refit communicates each parameter in its own dtype: a bf16 student at TP=2 and at PP=2 (gloo)
streams exactly the tensors the HF export writes, bit for bit, and exactly their bytes.

Before: `dequantize()` turned every bf16 shard into an fp32 copy, so the stream was fp32 (twice the
bytes) and at PP=2 the owning stage broadcast fp32 into the other stage's bf16 buffer (gloo aborted
with "Received data size doesn't match expected size").
"""
import pytest
import torch

from opd_megatron.rollout.refit import ParamSpec, check_tensor
from tests.launch import last_json, torchrun

WORKER = "tests/rollout/workers/refit_precision_worker.py"


@pytest.fixture(scope="module", params=[(2, 1), (1, 2)], ids=["tp2", "pp2"])
def report(request, tmp_path_factory):
    tp, pp = request.param
    out = tmp_path_factory.mktemp(f"refit_tp{tp}pp{pp}")
    return last_json(torchrun(WORKER, 2, str(out), str(tp), str(pp), timeout=600).stdout)


@pytest.mark.parametrize("case", ["qwen3/tied", "llama/untied"])
def test_bf16_refit_stream_equals_the_hf_export_bit_for_bit(report, case):
    r = report[case]
    assert r["names_equal"]
    assert r["dtypes"] == ["torch.bfloat16"]
    assert r["bit_identical"]


@pytest.mark.parametrize("case", ["qwen3/tied", "llama/untied"])
def test_bf16_refit_moves_the_parameters_bytes_in_the_rollout_dtype(report, case):
    r = report[case]
    assert r["refit_bytes"] == r["parameter_bytes"] == r["bf16_parameter_bytes"]


def test_a_collective_refuses_a_tensor_of_another_dtype_or_shape():
    spec = ParamSpec("decoder.layers.0.mlp.linear_fc2.weight", (4, 6), torch.bfloat16, 0, 1)
    check_tensor(torch.zeros(4, 6, dtype=torch.bfloat16), spec, (4, 6), "broadcast")
    with pytest.raises(RuntimeError, match=r"refit broadcast of decoder.layers.0.mlp.linear_fc2."
                                           r"weight: got torch.float32 \(4, 6\), every rank "
                                           r"expects torch.bfloat16 \(4, 6\)"):
        check_tensor(torch.zeros(4, 6), spec, (4, 6), "broadcast")
    with pytest.raises(RuntimeError, match=r"got torch.bfloat16 \(4, 3\)"):
        check_tensor(torch.zeros(4, 3, dtype=torch.bfloat16), spec, (4, 6), "broadcast")
