"""Rollout batches shared by the RL stages: sample, decode, build trainable sequences, score
tokens with a (frozen or live) model, and the per-response diagnostics docs/LOSSES.md asks for.

Every micro-batch carries `engine_logprobs` [b, s], aligned with `labels`: the rollout engine's
log-prob of each response token (0 elsewhere), of the distribution the trainer computes (after
temperature, before top-k/top-p truncation: the `Rollout` contract of both engines). They are
GRPO's π_old and what the trainer's own log-probs are checked against.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opd_megatron.data.encoding import encode_prompt
from opd_megatron.data.shapes import ShapeContract
from opd_megatron.data.overlong import keep_last
from opd_megatron.data.tiny_tokenizer import HEDGING_WORDS
from opd_megatron.losses import vocab_parallel_logprobs
from opd_megatron.rollout.base import Rollout
from opd_megatron.rollout.refit import refit_error_metrics
from opd_megatron.stages.batching import shifted_microbatches
from opd_megatron.stages.timing import phase
from opd_megatron.trainer.schedule import forward_outputs


@dataclass
class RolloutBatch:
    examples: list            # PromptExample per rollout
    rollouts: list[Rollout]
    texts: list[str]
    microbatches: list[dict]  # student sequences: prompt + response, loss on response tokens
    # refit/gen_kl_error & co. of a verified refit (see `verify_rollouts`); {} when not verified.
    refit_metrics: dict = field(default_factory=dict)


def generate_rollouts(ctx, examples: list, step: int, draw: int = 0) -> list[Rollout]:
    """Refit the engine to the live weights, then sample (`draw` > 0: a further draw of the same
    step, with its own seed, for dynamic sampling)."""
    limit = ctx.cfg.data.max_seq_length   # data.overlong_prompt: truncate_left keeps the tail
    prompts = [keep_last(encode_prompt(ctx.tokenizer, ex), limit) for ex in examples]
    for chunk in ctx.model.chunks:
        chunk.eval()
    with phase("refit"):
        ctx.engine.update_weights(ctx.model.chunks)
    with phase("generate"):
        return ctx.engine.generate(prompts, ctx.training_sampling(step, draw))


def sample_rollouts(ctx, examples: list, step: int) -> RolloutBatch:
    rollouts = generate_rollouts(ctx, examples, step)
    batch = rollout_batch(ctx.tokenizer, [examples[r.prompt_index] for r in rollouts], rollouts,
                          ctx.cfg.trainer.micro_batch_size, ctx.shapes)
    every = ctx.cfg.rollout.verify_every
    if ctx.cfg.rollout.engine == "vllm" and every and step % every == 0:
        batch.refit_metrics = verify_rollouts(ctx.model.chunks, ctx.arch.vocab_size, rollouts,
                                              ctx.cfg.rollout.temperature)
    return batch


def verify_rollouts(chunks, vocab_size: int, rollouts: list[Rollout],
                    temperature: float) -> dict[str, float]:
    """The refit check on rollouts just sampled: the engine's log-probs against the student's
    teacher-forced ones in eval mode (`refit_error_metrics`, as `refit/...`); {} off the last
    pipeline stage. The native engine samples from the trainer's own weights, so only vLLM
    needs it. (The training forward's own comparison is `gen_kl_error`, offpolicy.py.)"""
    from megatron.core import parallel_state as ps

    scored = score_rollouts(chunks, vocab_size, temperature or 1.0)(rollouts)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return {}
    metrics = refit_error_metrics([r.logprobs for r in rollouts], scored)
    return {f"refit/{name}": value for name, value in metrics.items()}


def score_rollouts(chunks, vocab_size: int, temperature: float = 1.0):
    """`score(rollouts)`: Megatron's teacher-forced log-probs of each rollout's response tokens,
    the trainer side of `verify_refit` (collective over the model replica; [] per rollout off
    the last pipeline stage)."""

    def score(rollouts) -> list[list[float]]:
        # One forward for all rollouts: right-padded rows, labels shifted by one, so response
        # token j of a rollout with P prompt tokens is label P - 1 + j.
        seqs = [r.prompt_ids + r.response_ids for r in rollouts]
        masks = [[0] * len(r.prompt_ids) + [1] * len(r.response_ids) for r in rollouts]
        logp = token_logprobs(chunks, shifted_microbatches(seqs, masks, len(rollouts), pad_id=0),
                              vocab_size, temperature)
        if not logp:
            return [[] for _ in rollouts]
        return [logp[0][row, len(r.prompt_ids) - 1:len(r.prompt_ids) - 1 + len(r.response_ids)]
                .tolist() for row, r in enumerate(rollouts)]
    return score


def decode(tokenizer, rollouts: list[Rollout]) -> list[str]:
    return [tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]


def rollout_batch(tokenizer, examples: list, rollouts: list[Rollout], micro_batch_size: int,
                  shapes: ShapeContract = ShapeContract()) -> RolloutBatch:
    """`examples[i]` is rollout i's example."""
    seqs = [r.prompt_ids + r.response_ids for r in rollouts]
    masks = [[0] * len(r.prompt_ids) + [1] * len(r.response_ids) for r in rollouts]
    microbatches = shifted_microbatches(seqs, masks, micro_batch_size, tokenizer.pad_token_id,
                                        extra={"engine_logprobs": engine_logprobs(rollouts)},
                                        shapes=shapes)
    return RolloutBatch(examples=list(examples), rollouts=rollouts,
                        texts=decode(tokenizer, rollouts), microbatches=microbatches)


def engine_logprobs(rollouts: list[Rollout]) -> torch.Tensor:
    """[n, L - 1] label-aligned engine log-probs: response token j of a rollout whose prompt has
    P tokens is label P - 1 + j of its shifted sequence."""
    length = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    out = torch.zeros(len(rollouts), length - 1)
    for row, r in enumerate(rollouts):
        if len(r.logprobs) != len(r.response_ids):
            raise ValueError(f"rollout {row}: {len(r.logprobs)} log-probs for "
                             f"{len(r.response_ids)} response tokens")
        start = len(r.prompt_ids) - 1
        out[row, start:start + len(r.response_ids)] = torch.tensor(r.logprobs)
    return out


def token_logprobs(chunks, microbatches: list[dict], vocab_size: int,
                   temperature: float = 1.0) -> list[torch.Tensor]:
    """Forward-only log p(labels) [b, s] per micro-batch (last pipeline stage; [] elsewhere)."""

    def logprobs(logits, mb):
        return vocab_parallel_logprobs(logits, mb["labels"], vocab_size=vocab_size,
                                       temperature=temperature).cpu()

    return forward_outputs(chunks, microbatches, logprobs)


def ngram_repetition(ids: list[int], n: int = 3) -> float:
    """Fraction of n-grams in a response that repeat an earlier n-gram of it."""
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def response_diagnostics(batch: RolloutBatch) -> dict[str, float]:
    count = max(len(batch.rollouts), 1)
    words = [t.lower().split() for t in batch.texts]
    total_words = max(sum(len(w) for w in words), 1)
    hedges = sum(1 for ws in words for w in ws if w.strip(",.!?") in HEDGING_WORDS)
    return {
        "response_length": sum(len(r.response_ids) for r in batch.rollouts) / count,
        "repetition_3gram": sum(ngram_repetition(r.response_ids) for r in batch.rollouts) / count,
        "hedging_frequency": hedges / total_words,
        "truncated_fraction": sum(r.finish_reason == "length" for r in batch.rollouts) / count,
    }
