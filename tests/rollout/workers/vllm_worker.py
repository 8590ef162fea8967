"""Worker for the real-vLLM tests (test_vllm_engine.py): vLLM's CPU build colocated with a
Megatron student under torchrun, one engine per rank, refit from the live weights.

    vllm_worker.py LAYOUT PRECISION CONFIGS

LAYOUT `tp2`: Megatron TP=2 on two ranks, two vLLM engines (vLLM TP=1) splitting the prompts;
`tp1`: TP=1 on two ranks (data parallel), an engine each. CONFIGS: comma-separated
`model_type:tied|untied`; `sampling` adds the sampling-contract checks on the first config.
For each config: rollouts before and after one optimizer step, each against the student's
teacher-forced log-probs and top-K. Prints one JSON report (global rank 0).
"""
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from opd_megatron.config.loader import load_config
from opd_megatron.config.schema import OptimizerConfig, ParallelConfig, PrecisionConfig
from opd_megatron.losses import vocab_parallel_logprobs
from opd_megatron.models.arch import ModelArch
from opd_megatron.rollout.base import SamplingParams
from opd_megatron.rollout.refit import refit_error_metrics, verify_refit
from opd_megatron.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine, logprobs_mode_for
from opd_megatron.runtime import distributed as rd
from opd_megatron.stages.config import StageConfig
from opd_megatron.stages.context import StageContext
from opd_megatron.trainer.engine import build_trainable
from tests.rollout.workers.native_worker import teacher_forced, truncated_at

CONF = Path(__file__).resolve().parents[3] / "conf"
RECIPES = sorted(p.name for p in CONF.glob("*.yaml") if not p.name.startswith("smoke"))
TOP_K = 5
MAX_MODEL_LEN = 64
# Five prompts: at TP=2 the two engines split them 3 / 2. Prompt 4 repeats prompt 0, so with
# per-request seeds it must draw other samples.
PROMPTS = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35, 36], [41], [11, 12, 13]]


def tiny_arch(model_type: str, tied: bool) -> ModelArch:
    # head_dim 32: vLLM's CPU attention needs a multiple of 32.
    return ModelArch(model_type=model_type, vocab_size=256, hidden_size=128, intermediate_size=192,
                     num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     tie_word_embeddings=tied)


def engine_for(arch, chunks, dtype, mode="processed_logprobs"):
    config = VLLMEngineConfig(max_model_len=MAX_MODEL_LEN, dtype=dtype, logprobs_mode=mode,
                              cpu_kv_cache_sequences=8)
    return VLLMRolloutEngine(config, arch, chunks=chunks)


def compare(chunks, arch, rollouts, temperature):
    """The rollouts' log-probs and top-K against teacher forcing (None off the last stage)."""
    reference = teacher_forced(chunks, rollouts, temperature or 1.0, arch.vocab_size, TOP_K)
    if not reference:
        return None
    out = refit_error_metrics([r.logprobs for r in rollouts],
                              [ref["logprobs"].tolist() for ref in reference])
    if rollouts[0].top_k_ids is not None:
        # The first TOP_K of however many the engine reported.
        out["top_ids_equal"] = all([ids[:TOP_K] for ids in r.top_k_ids] == ref["top_ids"].tolist()
                                   for r, ref in zip(rollouts, reference))
        out["top_logprobs_max_diff"] = max(
            (torch.tensor([lps[:TOP_K] for lps in r.top_k_logprobs])
             - ref["top_logprobs"]).abs().max().item()
            for r, ref in zip(rollouts, reference) if r.response_ids)
    return out


def optimizer_step(model, arch):
    """One large step of next-token cross-entropy on random tokens: every weight moves,
    the (tied) embedding included."""
    tokens = torch.randint(0, arch.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    mbs = [{"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
            "loss_mask": torch.ones(2, 16)}]

    def loss_fn(logits, mb):
        loss_sum = -vocab_parallel_logprobs(logits, mb["labels"], vocab_size=arch.vocab_size).sum()
        tokens = mb["loss_mask"].sum()
        return loss_sum, tokens, {"loss_sum": loss_sum.detach(), "tokens": tokens}

    model.train()
    _, info = model.train_step(mbs, loss_fn)
    model.eval()
    return bool(info["update_applied"])


def config_checks(arch, parallel, precision, dtype):
    model = build_trainable(arch, parallel, PrecisionConfig(precision=precision),
                            OptimizerConfig(lr=3e-2, lr_decay_style="constant"), total_steps=2)
    model.eval()
    engine = engine_for(arch, model.chunks, dtype)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, n=2, seed=5, return_top_k=TOP_K)
    before = engine.generate(PROMPTS, sampling)
    report = {"before": compare(model.chunks, arch, before, 1.0),
              "refit_tensors": engine.last_refit.tensors,
              "update_applied": optimizer_step(model, arch)}
    engine.update_weights(model.chunks)
    after = engine.generate(PROMPTS, sampling)
    report["after"] = compare(model.chunks, arch, after, 1.0)
    report["rollouts_changed"] = ([r.response_ids for r in before]
                                  != [r.response_ids for r in after])
    report["prompt_major"] = [r.prompt_index for r in after] == [i for i in range(5) for _ in "ab"]
    report["ranks_agree"] = ranks_agree(after)
    return report, model, engine


def ranks_agree(rollouts) -> bool:
    mine = [(r.prompt_index, r.response_ids, r.logprobs) for r in rollouts]
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return all(e == everyone[0] for e in everyone)


def sampling_checks(arch, model, engine, dtype):
    """Stop tokens, n samples, per-request seeds, both log-prob modes, the recipes' sampling."""
    chunks = model.chunks
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6))
    stop = greedy[0].response_ids[2]
    stopped = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=6,
                                                      stop_token_ids=(stop,)))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, n=3, seed=11)
    first, again = engine.generate(PROMPTS, sampling), engine.generate(PROMPTS, sampling)
    other = engine.generate(PROMPTS, dataclasses.replace(sampling, seed=12))
    tokens = [r.response_ids for r in first]
    tempered = engine.generate(PROMPTS, SamplingParams(temperature=0.7, max_new_tokens=6, seed=1,
                                                       return_top_k=TOP_K))
    report = {
        "greedy": compare(chunks, arch, greedy, 0.0),
        "stop_truncates": [r.response_ids for r in stopped]
        == [truncated_at(r.response_ids, stop) for r in greedy],
        "stop_reasons": [r.finish_reason for r in stopped]
        == ["stop" if stop in r.response_ids else "length" for r in greedy],
        "some_stopped_early": len(stopped[0].response_ids) < len(greedy[0].response_ids),
        "samples_per_prompt": [r.prompt_index for r in first] == [i for i in range(5)
                                                                  for _ in range(3)],
        "samples_differ_within_prompt": all(len({tuple(t) for t in tokens[i:i + 3]}) == 3
                                            for i in range(0, 15, 3)),
        # Prompt 4 is prompt 0 again: its own request seed gives it its own samples.
        "repeated_prompt_draws_anew": tokens[0:3] != tokens[12:15],
        "reproducible": tokens == [r.response_ids for r in again],
        "seed_changes_samples": tokens != [r.response_ids for r in other],
        "processed_tempered": compare(chunks, arch, tempered, 0.7),
    }
    # Raw log-probs: truncated sampling at temperature 1 reports the untruncated distribution.
    raw = engine_for(arch, chunks, dtype, mode="raw_logprobs")
    truncated = raw.generate(PROMPTS, SamplingParams(temperature=1.0, top_k=20, top_p=0.9,
                                                     max_new_tokens=6, seed=2, return_top_k=20))
    report["raw_truncated"] = compare(chunks, arch, truncated, 1.0)
    report["raw_within_top_k"] = all(t in ids for r in truncated
                                     for t, ids in zip(r.response_ids, r.top_k_ids))
    report["recipes"] = recipe_checks(arch, model, {"processed_logprobs": engine,
                                                    "raw_logprobs": raw})
    return report


def recipe_checks(arch, model, engines):
    """Each stage recipe's (OPD, OPSD, RLVR, SFT) training and evaluation sampling (lengths capped) on the engine
    of the recipe's log-prob mode: training rollouts carry the contract's log-probs."""
    out = {}
    for name in RECIPES:
        cfg = load_config(CONF / name, StageConfig)
        ctx = StageContext(cfg=cfg, arch=arch, model=model, tokenizer=None, tokenizer_dir="",
                           dp_rank=0, dp_size=1)
        r = cfg.rollout
        engine = engines[logprobs_mode_for(r.temperature, r.top_k, r.top_p)]
        train = dataclasses.replace(ctx.training_sampling(step=0), max_new_tokens=4)
        evaluation = dataclasses.replace(ctx.eval_sampling(), max_new_tokens=4)
        metrics = verify_refit(engine, PROMPTS[:2], train, lambda rollouts: [
            ref["logprobs"].tolist() for ref in teacher_forced(
                model.chunks, rollouts, train.temperature or 1.0, arch.vocab_size, TOP_K)])
        evaluated = engine.generate(PROMPTS[:2], evaluation)
        out[name] = {"gen_kl_error": metrics["gen_kl_error"],
                     "eval_logprobs_nan": all(math.isnan(lp) for e in evaluated
                                              for lp in e.logprobs),
                     "eval_sampled": bool(evaluated) and all(e.response_ids for e in evaluated)}
    return out


def main():
    layout, precision, configs = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    parallel = ParallelConfig(tensor_parallel={"tp2": 2, "tp1": 1}[layout])
    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    rd.initialize(parallel, seed=1234)
    report = {}
    for index, spec in enumerate(c for c in configs if c != "sampling"):
        model_type, tied = spec.split(":")
        arch = tiny_arch(model_type, tied == "tied")
        report[spec], model, engine = config_checks(arch, parallel, precision, dtype)
        if index == 0 and "sampling" in configs:
            report["sampling"] = sampling_checks(arch, model, engine, dtype)
    rank = torch.distributed.get_rank()
    rd.shutdown()
    if rank == 0:
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
