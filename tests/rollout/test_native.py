"""The native Megatron rollout engine at TP1, TP2, PP2, PP2xVPP2 and TP2xPP2 (CPU, gloo).

One torchrun launch per layout runs every check (workers/native_worker.py); the layouts share
weights through a checkpoint saved by the TP1PP1 reference.
"""
import types

import pytest
import torch

from opd_megatron.models.arch import ModelArch
from opd_megatron.rollout.base import SamplingParams
from opd_megatron.rollout.native import NativeRolloutEngine
from tests.launch import last_json, torchrun

WORKER = "tests/rollout/workers/native_worker.py"
# (name, nproc, tp, pp, vpp)
LAYOUTS = [
    ("tp2", 2, 2, 1, 0),
    ("pp2", 2, 1, 2, 0),
    ("pp2vpp2", 2, 1, 2, 2),
    ("tp2pp2", 4, 2, 2, 0),
]
NAMES = ["tp1"] + [layout[0] for layout in LAYOUTS]
# fp32 noise between a KV-cached step and a full teacher-forced forward.
LOGPROB_TOL = 1e-5


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("native_rollout")
    found = {"tp1": last_json(torchrun(WORKER, 1, "reference", str(out), "1", "1", "0").stdout)}
    for name, nproc, tp, pp, vpp in LAYOUTS:
        found[name] = last_json(torchrun(WORKER, nproc, "layout", str(out), str(tp), str(pp),
                                         str(vpp)).stdout)
    return found


@pytest.mark.parametrize("name", NAMES)
def test_logprobs_and_top_k_equal_teacher_forcing(reports, name):
    for key in ("greedy_errors", "tempered_errors"):
        errors = reports[name][key]
        assert errors["logprobs"] < LOGPROB_TOL, key
        assert errors["top_logprobs"] < LOGPROB_TOL, key
        assert errors["top_ids_equal"], key


@pytest.mark.parametrize("name", NAMES[1:])
def test_greedy_tokens_equal_tp1(reports, name):
    reference = reports["tp1"]
    assert reference["greedy_min_margin"] > 1e-4   # the comparison is not decided by noise
    assert reports[name]["greedy"] == reference["greedy"]
    assert all(len(tokens) == 6 for tokens in reference["greedy"])
    assert set(reports[name]["greedy_finish"]) == {"length"}


@pytest.mark.parametrize("name", NAMES)
def test_filler_rows_of_the_fp8_row_multiple_change_nothing(reports, name):
    found = reports[name]["row_multiple"]
    assert found["same_tokens"] and found["logprob_diff"] < LOGPROB_TOL


@pytest.mark.parametrize("name", NAMES[1:])
def test_seeded_samples_equal_tp1(reports, name):
    assert reports[name]["sampled"] == reports["tp1"]["sampled"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("check", ["stop_token_truncates", "eos_token_truncates", "finish_reasons",
                                   "some_stopped_early"])
def test_stop_tokens_end_sequences(reports, name, check):
    assert reports[name]["stop"][check]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("check", ["prompt_major", "prompts_kept", "samples_differ_within_group",
                                   "reproducible", "seed_changes_samples", "batching_invariant",
                                   "within_top_k"])
def test_sampling_n_seed_and_truncation(reports, name, check):
    assert reports[name]["sampled_checks"][check]


@pytest.mark.parametrize("name", NAMES)
def test_every_rank_returns_the_same_rollouts(reports, name):
    assert reports[name]["ranks_agree"]


@pytest.mark.parametrize("name", NAMES)
def test_training_mode_restored(reports, name):
    assert reports[name]["training_mode_restored"]


@pytest.mark.parametrize("name", NAMES)
def test_padded_vocab_never_sampled(reports, name):
    # The padded entries were given by far the largest logits before sampling.
    padded = reports[name]["padded_vocab"]
    assert padded["max_token"] < 300
    assert padded["sampled_tokens_vary"]


# --- argument checks: no Megatron needed -------------------------------------------------------

ARCH = ModelArch(model_type="qwen3", vocab_size=300, hidden_size=64, intermediate_size=96,
                 num_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _chunk(sequence_parallel=False, context_parallel_size=1):
    chunk = torch.nn.Module()
    chunk.config = types.SimpleNamespace(sequence_parallel=sequence_parallel,
                                         context_parallel_size=context_parallel_size)
    return chunk


def test_unwraps_ddp_chunks():
    inner = _chunk()
    wrapper = torch.nn.Module()
    wrapper.module = inner
    engine = NativeRolloutEngine([wrapper], ARCH, eos_token_ids=2, pad_token_id=0)
    assert engine._chunks == [inner]
    assert engine.eos_token_ids == (2,)


@pytest.mark.parametrize("config", [{"sequence_parallel": True}, {"context_parallel_size": 2}])
def test_rejects_sequence_and_context_parallel(config):
    with pytest.raises(ValueError, match="sequence or context"):
        NativeRolloutEngine([_chunk(**config)], ARCH, eos_token_ids=None, pad_token_id=0)


def test_rejects_pad_outside_vocab():
    with pytest.raises(ValueError, match="pad_token_id"):
        NativeRolloutEngine([_chunk()], ARCH, eos_token_ids=None, pad_token_id=300)


@pytest.mark.parametrize("prompt, match", [([], "empty"), ([1, 300], "outside"), ([-1], "outside")])
def test_rejects_bad_prompts(prompt, match):
    engine = NativeRolloutEngine([_chunk()], ARCH, eos_token_ids=None, pad_token_id=0)
    with pytest.raises(ValueError, match=match):
        engine.generate([[1, 2], prompt], SamplingParams())
