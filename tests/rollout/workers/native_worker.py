"""Worker for the native rollout tests: every check at one parallel layout (see test_native.py).

`reference` builds a random model at TP1PP1 and saves it; every other layout loads that
checkpoint, so all layouts sample from the same weights. Prints one JSON report (from TP rank 0
of the last pipeline stage).
"""
import hashlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from opd_megatron.checkpoint.megatron_dist import load_model, save_model
from opd_megatron.config.schema import OptimizerConfig, ParallelConfig, PrecisionConfig
from opd_megatron.losses import vocab_parallel_logprobs
from opd_megatron.models.arch import ModelArch
from opd_megatron.rollout.base import SamplingParams
from opd_megatron.rollout.native import NativeRolloutEngine
from opd_megatron.runtime import distributed as rd
from opd_megatron.trainer.engine import build_trainable
from opd_megatron.trainer.schedule import run_microbatches

ARCH = ModelArch(model_type="qwen3", vocab_size=300, hidden_size=64, intermediate_size=96,
                 num_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=False)
# Six prompts of different lengths: with max_batch_size=4 that is one full and one partial batch.
PROMPTS = [[11, 12, 13], [21], [31, 32, 33, 34, 35, 36, 37], [41, 42], [51, 52, 53, 54, 55],
           [61, 62, 63, 64]]
TOP_K = 3


def output_weights(chunks):
    """This rank's output-layer shard with the global vocabulary id of each row, or None."""
    from megatron.core import parallel_state as ps

    module = chunks[-1].module
    if not module.post_process:
        return None, None
    weight = module.output_layer.weight
    ids = torch.arange(weight.shape[0]) + ps.get_tensor_model_parallel_rank() * weight.shape[0]
    return weight, ids


def teacher_forced(chunks, rollouts, temperature, vocab_size=ARCH.vocab_size, top_k=TOP_K):
    """Per rollout: log-probs of its response tokens and the top-K of the full distribution at
    each response position, from one plain forward over prompt + response (last stage only)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    sequences = [r.prompt_ids + r.response_ids for r in rollouts]
    width = max(map(len, sequences))
    microbatches = []
    for seq in sequences:
        padded = torch.tensor(seq + [0] * (width - len(seq)))
        microbatches.append({"input_ids": padded[None], "labels": torch.roll(padded, -1)[None]})

    def score(output, mb):
        logits = output.float()
        logprobs = vocab_parallel_logprobs(logits, mb["labels"], vocab_size=vocab_size,
                                           temperature=temperature)
        full = gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]
        top = torch.topk(torch.log_softmax(full / temperature, dim=-1), top_k, dim=-1)
        return output.new_zeros(()), torch.tensor(1), {
            "logprobs": logprobs[0], "top_ids": top.indices[0], "top_logprobs": top.values[0]}

    outputs = run_microbatches(chunks, microbatches, score, forward_only=True)
    spans = [slice(len(r.prompt_ids) - 1, len(r.prompt_ids) + len(r.response_ids) - 1)
             for r in rollouts]
    return [{key: value[span] for key, value in out.items()} for out, span in zip(outputs, spans)]


def logprob_errors(chunks, rollouts, temperature):
    reference = teacher_forced(chunks, rollouts, temperature)
    if not reference:
        return None
    errors = {"logprobs": 0.0, "top_logprobs": 0.0, "top_ids_equal": True}
    for rollout, ref in zip(rollouts, reference):
        errors["logprobs"] = max(errors["logprobs"], (
            torch.tensor(rollout.logprobs) - ref["logprobs"]).abs().max().item())
        if rollout.top_k_ids is not None:
            errors["top_ids_equal"] &= rollout.top_k_ids == ref["top_ids"].tolist()
            errors["top_logprobs"] = max(errors["top_logprobs"], (
                torch.tensor(rollout.top_k_logprobs) - ref["top_logprobs"]).abs().max().item())
    return errors


def truncated_at(response, stop):
    return response[:response.index(stop) + 1] if stop in response else response


def stop_checks(model, greedy, sampling):
    """A token the greedy run produces, used as a stop token and as an EOS token."""
    stop = greedy[0].response_ids[2]
    expected = [truncated_at(r.response_ids, stop) for r in greedy]
    reasons = ["stop" if stop in r.response_ids else "length" for r in greedy]
    by_stop = NativeRolloutEngine(model.chunks, ARCH, eos_token_ids=None, pad_token_id=0,
                                  max_batch_size=4).generate(
        PROMPTS, SamplingParams(**{**asdict(sampling), "stop_token_ids": (stop,)}))
    by_eos = NativeRolloutEngine(model.chunks, ARCH, eos_token_ids=[stop], pad_token_id=0,
                                 max_batch_size=4).generate(PROMPTS, sampling)
    return {
        "stop_token_truncates": [r.response_ids for r in by_stop] == expected,
        "eos_token_truncates": [r.response_ids for r in by_eos] == expected,
        "finish_reasons": [r.finish_reason for r in by_stop] == reasons
        and [r.finish_reason for r in by_eos] == reasons,
        "some_stopped_early": len(expected[0]) < len(greedy[0].response_ids),
    }


def sampled_checks(model, engine):
    sampling = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=4, n=2,
                              seed=7, return_top_k=20)
    first = engine.generate(PROMPTS, sampling)
    again = engine.generate(PROMPTS, sampling)
    other_seed = engine.generate(PROMPTS, SamplingParams(**{**asdict(sampling), "seed": 8}))
    rebatched = NativeRolloutEngine(model.chunks, ARCH, eos_token_ids=None, pad_token_id=0,
                                    max_batch_size=16).generate(PROMPTS, sampling)
    tokens = [r.response_ids for r in first]
    return tokens, {
        "prompt_major": [r.prompt_index for r in first] == [i for i in range(6) for _ in range(2)],
        "prompts_kept": all(r.prompt_ids == PROMPTS[r.prompt_index] for r in first),
        "samples_differ_within_group": all(tokens[i] != tokens[i + 1]
                                           for i in range(0, len(tokens), 2)),
        "reproducible": tokens == [r.response_ids for r in again],
        "seed_changes_samples": tokens != [r.response_ids for r in other_seed],
        "batching_invariant": tokens == [r.response_ids for r in rebatched],
        # The top-20 ids are reported before truncation, and top_k=20 keeps exactly those.
        "within_top_k": all(t in ids for r in first for t, ids in zip(r.response_ids, r.top_k_ids)),
    }


def padded_vocab_checks(model, engine):
    """Make every padded vocabulary entry dominate the logits: it still must never be sampled."""
    weight, ids = output_weights(model.chunks)
    if weight is not None:
        with torch.no_grad():
            weight[ids < ARCH.vocab_size] = 0
            weight[ids >= ARCH.vocab_size] = 50 * torch.randn_like(weight[ids >= ARCH.vocab_size])
    engine.update_weights(model.chunks)   # shared weights: nothing to copy
    greedy = engine.generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=2))
    sampled = engine.generate(PROMPTS, SamplingParams(temperature=1, max_new_tokens=3, seed=1, n=2))
    tokens = [t for r in greedy + sampled for t in r.response_ids]
    return {"max_token": max(tokens), "sampled_tokens_vary": len(set(tokens)) > 10}


def digest(rollouts) -> str:
    return hashlib.sha256(json.dumps([asdict(r) for r in rollouts]).encode()).hexdigest()


def main():
    mode, out_dir, tp, pp, vpp = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:6])
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp,
                              virtual_pipeline_parallel=vpp or None)
    rd.initialize(parallel, seed=1234)
    from megatron.core import parallel_state as ps

    # A trainable (DDP-wrapped) model, as a student is.
    model = build_trainable(ARCH, parallel, PrecisionConfig(), OptimizerConfig(), total_steps=1)
    if mode == "reference":
        weight, _ = output_weights(model.chunks)
        with torch.no_grad():
            weight.mul_(10)   # peaked distributions: greedy margins far above float noise
        save_model(model.chunks, out_dir / "ref")
    else:
        load_model(model.chunks, out_dir / "ref")
    engine = NativeRolloutEngine(model.chunks, ARCH, eos_token_ids=None, pad_token_id=0,
                                 max_batch_size=4)

    model.train()
    greedy_params = SamplingParams(temperature=0, max_new_tokens=6, return_top_k=TOP_K)
    greedy = engine.generate(PROMPTS, greedy_params)
    report = {"training_mode_restored": all(m.training for chunk in model.chunks
                                            for m in chunk.module.modules())}
    model.eval()
    tempered = engine.generate(PROMPTS, SamplingParams(temperature=0.7, max_new_tokens=6, seed=3,
                                                       return_top_k=TOP_K))
    # FP8's row multiple (the shape contract): filler rows must not change a single rollout.
    fp8_rows = NativeRolloutEngine(model.chunks, ARCH, eos_token_ids=None, pad_token_id=0,
                                   max_batch_size=4, row_multiple=16)
    padded = fp8_rows.generate(PROMPTS, SamplingParams(temperature=0.7, max_new_tokens=6, seed=3,
                                                       return_top_k=TOP_K))
    report["row_multiple"] = {
        "same_tokens": [r.response_ids for r in padded] == [r.response_ids for r in tempered],
        "logprob_diff": max(abs(a - b) for p, t in zip(padded, tempered)
                            for a, b in zip(p.logprobs, t.logprobs))}
    report.update(
        greedy=[r.response_ids for r in greedy],
        greedy_finish=[r.finish_reason for r in greedy],
        # Layouts agree on greedy tokens only if logit noise (~1e-6) is far below the margins.
        greedy_min_margin=min(top[0] - top[1] for r in greedy for top in r.top_k_logprobs),
        greedy_errors=logprob_errors(model.chunks, greedy, 1.0),
        tempered_errors=logprob_errors(model.chunks, tempered, 0.7),
        stop=stop_checks(model, greedy, greedy_params),
    )
    report["sampled"], report["sampled_checks"] = sampled_checks(model, engine)
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest(greedy + tempered))
    report["ranks_agree"] = len(set(digests)) == 1
    report["padded_vocab"] = padded_vocab_checks(model, engine)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        print(json.dumps(report), flush=True)
    rd.shutdown()


if __name__ == "__main__":
    main()
