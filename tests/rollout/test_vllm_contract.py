"""Pure contract of the vLLM rollout adapter (the engine itself runs on real vLLM in
test_vllm_engine.py).

What vLLM receives is checked exactly: the sampling arguments, the prompts, the device settings,
the weights the refit streams (names, shapes and order equal to the HF export's and to
transformers' own state dict, values that give transformers the Megatron student's logits, bucket
sizes bounded) at TP=2 and PP=2; and the conversion of what comes back, on records with the
fields of vLLM's RequestOutput / CompletionOutput / Logprob (the edge cases real vLLM does not
produce on demand: aborted requests, a sampled token outside the top-K).

The refit half runs as a torchrun worker: this file, executed as a script (see `__main__`).
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opd_megatron.models.arch import ModelArch
from opd_megatron.rollout import vllm_engine as ve
from opd_megatron.rollout.base import SamplingParams
from opd_megatron.rollout.refit import bucket_by_bytes, merge_tp_shards, refit_error_metrics
from tests.rollout.archs import tiny_arch

CONFIGS = [(model_type, tied) for model_type in ("llama", "qwen2", "qwen3", "mistral")
           for tied in (False, True)]
# (tensor parallel, pipeline parallel) -> architectures. Every architecture at TP=2 (the shard
# merging); PP=2 (the stage broadcast and the last stage's copy of a tied embedding) once each way.
LAYOUTS = {(2, 1): CONFIGS, (1, 2): [("qwen3", True), ("llama", False)]}
BUCKET_BYTES = 40_000        # smaller than the embedding, larger than most layer tensors
BATCH, SEQ = 2, 12


# --- sampling parameters and prompts ------------------------------------------------------------

def test_sampling_kwargs_map_every_field():
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, max_new_tokens=33,
                              stop_token_ids=(7, 3), n=4, seed=11, return_top_k=20)
    assert ve.to_vllm_sampling_kwargs(sampling, eos_token_ids=[2, 3], prompt_index=5) == {
        "n": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_tokens": 33,
        "stop_token_ids": [2, 3, 7], "seed": 11 * 1_000_003 + 5 * 4, "logprobs": 20,
        "detokenize": False}


def test_every_sample_of_every_prompt_has_its_own_seed_stream():
    # vLLM seeds sample k of a request with seed + k.
    streams = [ve.request_seed(3, i, 4) + k for i in range(50) for k in range(4)]
    assert len(set(streams)) == len(streams)
    assert ve.request_seed(None, 7, 2) is None


def test_sampling_kwargs_disable_top_k_and_always_ask_for_logprobs():
    kwargs = ve.to_vllm_sampling_kwargs(SamplingParams())
    assert kwargs["top_k"] == -1          # vLLM's "disabled"; our 0
    assert kwargs["logprobs"] == 1        # the sampled token's log-prob is always needed
    assert kwargs["stop_token_ids"] == [] and kwargs["seed"] is None


def test_prompts_are_token_ids():
    assert ve.to_vllm_prompts([[1, 2], (3,)]) == [{"prompt_token_ids": [1, 2]},
                                                  {"prompt_token_ids": [3]}]


@pytest.mark.parametrize("temperature,top_k,top_p,mode", [
    (0.7, 0, 1.0, "processed_logprobs"),
    (1.0, 40, 0.95, "raw_logprobs"),
    (0.0, 40, 1.0, "raw_logprobs"),
])
def test_logprobs_mode_matches_the_rollout_contract(temperature, top_k, top_p, mode):
    assert ve.logprobs_mode_for(temperature, top_k, top_p) == mode
    ve.check_logprobs_mode(mode, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))


def test_logprobs_mode_refuses_what_vllm_cannot_report():
    with pytest.raises(ValueError, match="temperature=0.7"):
        ve.logprobs_mode_for(0.7, 40, 1.0)
    with pytest.raises(ValueError, match="processed_logprobs"):
        ve.check_logprobs_mode("processed_logprobs", SamplingParams(top_p=0.9))


GPU = SimpleNamespace(is_cpu=lambda: False, is_sleep_mode_available=lambda: True)


def test_engine_kwargs_colocate_with_own_tensor_parallelism(tmp_path):
    config = ve.VLLMEngineConfig(tensor_parallel_size=4, gpu_memory_utilization=0.4, seed=3)
    arch = tiny_arch("qwen3", True)
    kwargs = ve.vllm_engine_kwargs(config, tmp_path, ve.device_settings(config, arch, GPU))
    assert kwargs["enable_sleep_mode"] is True and kwargs["enforce_eager"] is False
    assert kwargs["kv_cache_memory_bytes"] is None          # from gpu_memory_utilization
    assert kwargs["tensor_parallel_size"] == 4
    assert kwargs["distributed_executor_backend"] == "external_launcher"
    assert kwargs["load_format"] == "dummy" and kwargs["skip_tokenizer_init"] is True
    assert kwargs["logprobs_mode"] == "processed_logprobs" and kwargs["seed"] == 3


def test_cpu_settings_have_no_sleep_mode_eager_and_a_sized_kv_cache():
    from vllm.platforms import current_platform   # this machine: vLLM's CPU build

    arch = tiny_arch("llama", False)
    config = ve.VLLMEngineConfig(max_model_len=100, dtype="float32", cpu_kv_cache_sequences=3)
    device = ve.device_settings(config, arch, current_platform)
    assert device.sleep is False and device.enforce_eager is True
    # keys + values, 4 layers x 2 KV heads x head_dim 16, fp32; 3 sequences of one 128-token
    # block each, plus vLLM's null block
    assert device.kv_cache_memory_bytes == 2 * 4 * 2 * 16 * 4 * 128 * (3 + 1)
    with pytest.raises(ValueError, match="max_model_len"):
        ve.device_settings(ve.VLLMEngineConfig(), arch, current_platform)


def test_engine_refuses_to_start_before_megatron_is_initialised():
    with pytest.raises(RuntimeError) as info:
        ve.VLLMRolloutEngine(ve.VLLMEngineConfig(max_model_len=64), tiny_arch("qwen3", True))
    assert "\n" not in str(info.value) and "parallel state" in str(info.value)


def test_engine_config_from_a_stage_recipe():
    from opd_megatron.stages.config import StageConfig

    cfg = StageConfig(stage="opd")
    cfg.rollout.engine, cfg.rollout.vllm_tensor_parallel = "vllm", 2
    cfg.rollout.vllm_gpu_memory_utilization, cfg.rollout.top_p = 0.35, 0.9
    cfg.precision.precision = "bf16"
    config = ve.engine_config(cfg, tiny_arch("qwen3", True))
    assert config.tensor_parallel_size == 2 and config.gpu_memory_utilization == 0.35
    assert config.logprobs_mode == "raw_logprobs"    # top-p at temperature 1
    assert config.dtype == "bfloat16" and config.seed == cfg.seed
    assert config.max_model_len == cfg.data.max_seq_length + cfg.rollout.max_new_tokens


def test_evaluation_sampling_is_not_held_to_the_logprob_mode():
    tempered = SamplingParams(temperature=0.6, top_p=0.95)
    with pytest.raises(ValueError, match="raw_logprobs"):
        ve.check_logprobs_mode("raw_logprobs", tempered)
    ve.check_logprobs_mode("raw_logprobs", SamplingParams(temperature=0.6, top_p=0.95,
                                                          logprobs=False))


def test_model_dir_is_the_architectures_hf_config(tmp_path):
    arch = tiny_arch("qwen3", True)
    path = ve.write_model_dir(arch, tmp_path / "m")
    assert ModelArch.from_hf_dir(path) == arch


# --- vLLM outputs -> rollouts --------------------------------------------------------------------
# Stand-ins with the fields of vllm.outputs.RequestOutput / CompletionOutput and
# vllm.logprobs.Logprob that the conversion reads.

@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = "stop"
    text: str = ""
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    prompt: str | None = None
    prompt_logprobs: list | None = None


def _position(sampled: int, sampled_rank: int, top: list[tuple[int, float]]) -> dict[int, Logprob]:
    """vLLM's per-position dict: the top-K (ranks 1..K) plus the sampled token if outside them."""
    entries = {tid: Logprob(lp, rank) for rank, (tid, lp) in enumerate(top, start=1)}
    if sampled not in entries:
        entries[sampled] = Logprob(-9.0, sampled_rank)
    return entries


def _two_requests():
    top = [(5, -0.1), (6, -2.0)]
    first = RequestOutput("0", [1, 2, 3], outputs=[
        CompletionOutput(1, [6, 9], [_position(6, 2, top), _position(9, 7, top)], "length"),
        CompletionOutput(0, [5], [_position(5, 1, top)], "stop"),
    ])
    second = RequestOutput("1", [4], outputs=[CompletionOutput(0, [], [], "length")])
    return [first, second]


def test_rollouts_from_vllm_outputs_with_top_k():
    rollouts = ve.rollouts_from_vllm(_two_requests(), prompt_indices=[3, 8], return_top_k=2)
    assert [(r.prompt_index, r.response_ids) for r in rollouts] == [(3, [5]), (3, [6, 9]), (8, [])]
    sample = rollouts[1]
    assert sample.prompt_ids == [1, 2, 3] and sample.finish_reason == "length"
    assert sample.logprobs == [-2.0, -9.0]            # sampled tokens, in or out of the top-K
    assert sample.top_k_ids == [[5, 6], [5, 6]]       # ranked, sampled-only entry left out
    assert sample.top_k_logprobs == [[-0.1, -2.0], [-0.1, -2.0]]
    assert rollouts[2].logprobs == [] and rollouts[2].top_k_ids == []


def test_rollouts_without_top_k_carry_only_sampled_logprobs():
    rollouts = ve.rollouts_from_vllm(_two_requests(), prompt_indices=[0, 1])
    assert rollouts[0].logprobs == [-0.1]
    assert rollouts[0].top_k_ids is None and rollouts[0].top_k_logprobs is None


def test_rollouts_refuse_aborted_or_logprob_less_outputs():
    aborted = RequestOutput("7", [1], [CompletionOutput(0, [2], [_position(2, 1, [(2, 0.0)])],
                                                        "abort")])
    with pytest.raises(RuntimeError, match="'abort'"):
        ve.rollouts_from_vllm([aborted], [0])
    bare = RequestOutput("8", [1], [CompletionOutput(0, [2], None)])
    with pytest.raises(RuntimeError, match="log-probs"):
        ve.rollouts_from_vllm([bare], [0])
    with pytest.raises(ValueError, match="2 vLLM outputs for 1 prompts"):
        ve.rollouts_from_vllm(_two_requests(), [0])


def test_engines_of_a_replica_split_prompts_and_merge_prompt_major():
    num_prompts, engines = 7, 3
    parts = [ve.replica_prompt_indices(num_prompts, engines, e) for e in range(engines)]
    assert sorted(i for part in parts for i in part) == list(range(num_prompts))
    per_engine = [ve.rollouts_from_vllm(
        [RequestOutput(str(i), [i], [CompletionOutput(k, [i, k], [_position(i, 1, [(i, 0.0)]),
                                                                   _position(k, 1, [(k, 0.0)])])
                                     for k in (1, 0)]) for i in part], part) for part in parts]
    merged = ve.merge_replica_rollouts(per_engine)
    assert [(r.prompt_index, r.response_ids[1]) for r in merged] == \
        [(i, k) for i in range(num_prompts) for k in (0, 1)]


def test_replica_layout_needs_vllm_groups_inside_megatron_tp_groups():
    layout = ve.replica_layout(megatron_tp=4, mp_size=8, mp_rank=5, vllm_tp=2)
    assert (layout.num_engines, layout.engine, layout.leader) == (4, 2, False)
    with pytest.raises(ValueError, match="must divide parallel.tensor_parallel=2"):
        ve.replica_layout(megatron_tp=2, mp_size=2, mp_rank=0, vllm_tp=4)


def test_missing_vllm_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)    # makes `import vllm` raise ImportError
    with pytest.raises(ve.VLLMUnavailableError) as info:
        ve.import_vllm()
    message = str(info.value)
    assert "\n" not in message
    assert "rollout.engine=vllm needs vllm" in message and "rollout.engine=native" in message


# --- pure refit pieces --------------------------------------------------------------------------

def megatron_split(full: torch.Tensor, world: int, dim: int, stride: int) -> list[torch.Tensor]:
    """Megatron's own strided partition (`_initialize_affine_weight_cpu`): world * stride blocks,
    rank r takes blocks r, r + world, ..."""
    blocks = torch.split(full, full.shape[dim] // (world * stride), dim)
    return [torch.cat(blocks[r::world], dim) for r in range(world)]


@pytest.mark.parametrize("world,dim,stride", [(2, 0, 2), (4, 0, 2), (2, 1, 1), (4, 0, 1)])
def test_merge_tp_shards_inverts_megatrons_partition(world, dim, stride):
    full = torch.arange(16 * 16, dtype=torch.float32).reshape(16, 16)
    assert torch.equal(merge_tp_shards(megatron_split(full, world, dim, stride), dim, stride), full)


def test_buckets_are_bounded_and_keep_order():
    sizes = [10, 30, 25, 100, 5, 5, 60]
    pairs = [(f"t{i}", torch.zeros(n, dtype=torch.uint8)) for i, n in enumerate(sizes)]
    buckets = list(bucket_by_bytes(pairs, 60))
    assert [name for b in buckets for name, _ in b] == [name for name, _ in pairs]
    assert [[t.numel() for _, t in b] for b in buckets] == [[10, 30], [25], [100], [5, 5], [60]]
    with pytest.raises(ValueError):
        list(bucket_by_bytes(pairs, 0))


def test_refit_error_metrics():
    same = refit_error_metrics([[-1.0, -2.0]], [[-1.0, -2.0]])
    assert same["gen_kl_error"] == 0.0 and same["gen_tokens"] == 2
    off = refit_error_metrics([[-1.0, -2.0]], [[-1.5, -2.0]])
    assert off["gen_kl_error"] == pytest.approx((math.exp(-0.5) + 0.5 - 1) / 2)
    assert off["gen_logprob_max_abs_diff"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="sequence 0"):
        refit_error_metrics([[-1.0]], [[-1.0, -2.0]])


# --- refit of a real Megatron model (torchrun worker below) ---------------------------------------

@pytest.fixture(scope="module")
def refit_report():
    from tests.launch import last_json, torchrun

    return last_json(torchrun(Path(__file__), 2, "worker", timeout=300).stdout)


def _case(tp: int, pp: int, model_type: str, tied: bool) -> str:
    return f"tp{tp}pp{pp}/{model_type}/{'tied' if tied else 'untied'}"


def _cases():
    return [_case(tp, pp, mt, tied)
            for (tp, pp), configs in LAYOUTS.items() for mt, tied in configs]


@pytest.mark.parametrize("case", _cases())
def test_refit_streams_what_the_hf_export_writes(refit_report, case):
    r = refit_report[case]
    assert r["names"] == r["mapping_names"], "refit order differs from the mapping's HF export"
    assert r["names"] == r["hf_names"], "refit order differs from transformers' state dict"
    assert r["shapes"] == r["hf_shapes"]
    assert r["load_missing"] == [] and r["load_unexpected"] == []
    assert r["ranks_agree"], "ranks of one replica streamed different weights"


@pytest.mark.parametrize("case", _cases())
def test_refit_values_give_the_students_logits(refit_report, case):
    # transformers, loaded with exactly the refit stream, reproduces the Megatron student.
    assert refit_report[case]["logits_max_diff"] < 1e-4


@pytest.mark.parametrize("case", _cases())
def test_refit_buckets_are_bounded(refit_report, case):
    r = refit_report[case]
    assert r["buckets"] > 1
    assert r["oversized_multi_tensor_buckets"] == 0
    assert r["max_bucket_bytes"] <= max(BUCKET_BYTES, r["largest_tensor_bytes"])


def _hf_model(arch: ModelArch):
    import transformers

    config = transformers.AutoConfig.for_model(**arch.to_hf_dict())
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


def _megatron_logits(chunks, tokens, vocab_size):
    """Full-vocabulary logits on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state as ps

    from opd_megatron.trainer.schedule import run_microbatches

    def keep(output, mb):
        group = ps.get_tensor_model_parallel_group()
        parts = [torch.empty_like(output) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(parts, output.detach().contiguous(), group=group)
        return output.sum() * 0, torch.tensor(1), {"logits": torch.cat(parts, -1)[..., :vocab_size]}

    out = run_microbatches(chunks, [{"input_ids": tokens}], keep, forward_only=True)
    return out[0]["logits"] if out else None


def _check_refit(arch: ModelArch, chunks) -> dict:
    from opd_megatron.checkpoint.mapping import mapping_for
    from opd_megatron.rollout.refit import refit, tensor_bytes

    buckets: list[list] = []
    stats = refit(lambda b: buckets.append([(n, t.clone()) for n, t in b]), chunks, arch,
                  BUCKET_BYTES)
    stream = [pair for bucket in buckets for pair in bucket]
    sizes = [sum(tensor_bytes(t) for _, t in b) for b in buckets]
    digest = [(name, float(t.double().sum()), float(t.double().abs().sum())) for name, t in stream]
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest)

    hf = _hf_model(arch)
    hf_state = [(k, list(v.shape)) for k, v in hf.state_dict().items()
                if not (arch.tie_word_embeddings and k == "lm_head.weight")]
    missing, unexpected = hf.load_state_dict(dict(stream), strict=False)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, arch.vocab_size, (BATCH, SEQ), generator=gen)
    megatron = _megatron_logits(chunks, tokens, arch.vocab_size)
    with torch.no_grad():
        reference = hf(input_ids=tokens).logits
    tied_head = ["lm_head.weight"] if arch.tie_word_embeddings else []
    return {
        "names": [n for n, _ in stream],
        "shapes": [list(t.shape) for _, t in stream],
        "mapping_names": [n for n, _ in mapping_for(arch).hf_specs()],
        "hf_names": [n for n, _ in hf_state],
        "hf_shapes": [s for _, s in hf_state],
        "load_missing": sorted(set(missing) - set(tied_head)),
        "load_unexpected": sorted(unexpected),
        "ranks_agree": all(d == digests[0] for d in digests),
        "logits_max_diff": None if megatron is None else float((megatron - reference).abs().max()),
        "buckets": stats.buckets,
        "max_bucket_bytes": stats.max_bucket_bytes,
        "largest_tensor_bytes": max(tensor_bytes(t) for _, t in stream),
        "oversized_multi_tensor_buckets": sum(1 for b, s in zip(buckets, sizes, strict=True)
                                              if len(b) > 1 and s > BUCKET_BYTES),
    }


def _merge_ranks(results: list[dict]) -> dict:
    """The first rank's report, with the logits difference of whichever rank computed it."""
    merged = dict(results[0])
    diffs = [r["logits_max_diff"] for r in results if r["logits_max_diff"] is not None]
    merged["logits_max_diff"] = max(diffs)
    return merged


def worker() -> None:
    from opd_megatron.config.schema import ParallelConfig, PrecisionConfig
    from opd_megatron.models.builder import build_model_chunks
    from opd_megatron.runtime import distributed as rd

    report = {}
    for (tp, pp), configs in LAYOUTS.items():
        parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
        rd.initialize(parallel, seed=1234)
        for model_type, tied in configs:
            arch = tiny_arch(model_type, tied)
            chunks = build_model_chunks(arch, parallel, PrecisionConfig())
            for chunk in chunks:
                chunk.eval()
            results = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(results, _check_refit(arch, chunks))
            report[_case(tp, pp, model_type, tied)] = _merge_ranks(results)
    rank = torch.distributed.get_rank()
    rd.shutdown()
    if rank == 0:
        print(json.dumps(report), flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    worker()
