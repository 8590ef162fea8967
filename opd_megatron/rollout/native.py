"""Native rollout: sampling with the Megatron model itself, under any TP / PP / VPP layout.

KV cache: megatron-core 0.16.1's `StaticInferenceContext`, passed as `inference_context` to
GPTModel.forward, runs on CPU with the local layer spec (measured at TP1, TP2, PP2 and TP2xPP2:
cached last-position logits equal a full forward to 4e-7; the tests also cover PP2xVPP2), so
steps never recompute the whole sequence. Every step goes through `forward_outputs`, so
Megatron's own pipeline schedules move activations between stages; each micro-batch carries its
own context because the cache is indexed by row within a forward call. With PP > 1 a batch is
split into PP micro-batches, which the interleaved (VPP) schedule requires and which lets the
stages overlap. Sampling runs on CPU: this engine is the CPU / small-scale path; large GPU runs
sample with vLLM.

Batching prompts of different lengths: one right-padded token buffer. Decoding starts at the end
of the shortest prompt; a row still inside its prompt is fed its own next prompt token instead of
the sample ("prompt forcing", as Megatron's static engine does). Every row therefore sits at its
true positions with a plain causal mask, and its log-probs are those of an unpadded forward. Rows
are sorted by prompt length so that a batch holds similar lengths and wastes few forced steps.

Agreement across ranks: TP rank 0 of the last pipeline stage samples (on CPU, from the logits
gathered over TP) and broadcasts each step's tokens, log-probs and top-K over the TP group, then
the last stage broadcasts them over the pipeline group. Every rank of the replica thus holds the
same tokens and returns the same rollouts. Seeded draws use one generator per sampled sequence
(see `sampling.row_generators`), so they do not depend on batching or layout.

Weights: the engine holds the student's live chunks (Megatron DDP wrappers unwrapped), so an
optimizer step is visible to the next `generate` without any copy; `update_weights` only rebinds.

Not supported: sequence parallelism and context parallelism (a decode step is one token long).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from opd_megatron.models.arch import ModelArch
from opd_megatron.rollout.base import Rollout, SamplingParams
from opd_megatron.rollout.sampling import (
    choose_tokens,
    row_generators,
    sampling_logprobs,
)
from opd_megatron.trainer.schedule import forward_outputs


@dataclass(frozen=True)
class _Row:
    """One sequence to sample: sample `index % n` of prompt `prompt_index`."""

    index: int
    prompt_index: int
    prompt: list[int]


class NativeRolloutEngine:
    """`RolloutEngine` over Megatron GPTModel chunks (a student's live chunks or frozen ones)."""

    def __init__(self, chunks: list[torch.nn.Module], arch: ModelArch, *,
                 eos_token_ids: int | Sequence[int] | None, pad_token_id: int,
                 max_batch_size: int = 32, row_multiple: int = 1):
        """`row_multiple`: every forward's row count divides by it (the run's ShapeContract:
        a decode step is one token per row, so FP8's multiple falls on the rows)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        if not 0 <= pad_token_id < arch.vocab_size:
            raise ValueError(f"pad_token_id={pad_token_id} is outside the vocabulary "
                             f"[0, {arch.vocab_size})")
        if isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.arch = arch
        self.eos_token_ids = tuple(eos_token_ids or ())
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.row_multiple = row_multiple
        self.update_weights(chunks)

    def update_weights(self, chunks: list[torch.nn.Module]) -> None:
        """Nothing to copy: the engine samples from these very modules, so it always sees the
        latest weights. Passing other chunks rebinds the engine to them."""
        modules = [getattr(chunk, "module", chunk) for chunk in chunks]
        config = modules[0].config
        if config.sequence_parallel or config.context_parallel_size > 1:
            raise ValueError("the native rollout engine does not support sequence or context "
                             "parallelism; sample with a layout without them (or with vLLM)")
        self._chunks = modules

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Rollout]:
        rows = [_Row(index * sampling.n + sample, index, self._checked_prompt(index, prompt))
                for index, prompt in enumerate(prompts) for sample in range(sampling.n)]
        generators = row_generators(sampling.seed, range(len(rows)))
        by_length = sorted(rows, key=lambda row: len(row.prompt))
        rollouts: list[Rollout | None] = [None] * len(rows)
        with _inference(self._chunks):
            for start in range(0, len(rows), self.max_batch_size):
                batch = by_length[start:start + self.max_batch_size]
                results = self._generate_batch(batch, sampling,
                                               [generators[row.index] for row in batch])
                for row, rollout in zip(batch, results):
                    rollouts[row.index] = rollout
        return rollouts

    def _checked_prompt(self, index: int, prompt: Sequence[int]) -> list[int]:
        ids = [int(token) for token in prompt]
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        if min(ids) < 0 or max(ids) >= self.arch.vocab_size:
            raise ValueError(f"prompt {index} has token ids outside the vocabulary "
                             f"[0, {self.arch.vocab_size})")
        return ids

    def _generate_batch(self, batch: list[_Row], sampling: SamplingParams,
                        generators: list[torch.Generator]) -> list[Rollout]:
        from megatron.core import parallel_state as ps

        # Equal micro-batches need a row count divisible by their number, each a multiple of
        # `row_multiple` rows: filler rows are finished from the start and never sampled.
        num_microbatches = ps.get_pipeline_model_parallel_world_size()
        step = num_microbatches * self.row_multiple
        rows = len(batch) + (-len(batch)) % step
        lengths = torch.tensor([len(row.prompt) for row in batch]
                               + [len(batch[0].prompt)] * (rows - len(batch)))
        total = int(lengths.max()) + sampling.max_new_tokens
        tokens = torch.full((rows, total), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(batch):
            tokens[i, :len(row.prompt)] = torch.tensor(row.prompt)
        last = lengths + sampling.max_new_tokens - 1       # position of the last allowed token
        stop_ids = torch.tensor(sorted({*self.eos_token_ids, *sampling.stop_token_ids}),
                                dtype=torch.long)
        finished = torch.arange(rows) >= len(batch)
        stopped = torch.zeros(rows, dtype=torch.bool)
        end = lengths.clone()                              # one past each row's last token
        history = torch.zeros(rows, total, _Step.width(sampling.return_top_k), dtype=torch.float64)
        forward = _CachedForward(self._chunks, rows, total, num_microbatches, self.arch.vocab_size)
        sampler = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        cached = 0                                         # positions already in the KV cache
        for position in range(int(lengths.min()), total):
            logits = forward(tokens[:, cached:position])
            cached = position
            active = ~finished & (lengths <= position)
            step = torch.zeros(rows, history.shape[-1], dtype=torch.float64)
            if sampler and active.any():
                picked = active.nonzero()[:, 0].tolist()
                step[active] = _Step.sample(logits[active].cpu(), sampling,
                                            [generators[i] for i in picked])
            step = _broadcast_from_sampler(step)
            history[:, position] = step
            sampled = step[:, 0].long()
            # Rows still inside their prompt keep their prompt token (prompt forcing).
            tokens[:, position] = torch.where(active, sampled, tokens[:, position])
            stopped |= active & torch.isin(sampled, stop_ids)
            newly_finished = active & (stopped | (last == position))
            end[newly_finished] = position + 1
            finished |= newly_finished
            if finished.all():
                break
        return [self._rollout(row, tokens[i], history[i], int(end[i]), bool(stopped[i]),
                              sampling.return_top_k)
                for i, row in enumerate(batch)]

    @staticmethod
    def _rollout(row: _Row, tokens: torch.Tensor, history: torch.Tensor, end: int, stopped: bool,
                 top_k: int) -> Rollout:
        span = slice(len(row.prompt), end)
        top_ids, top_logprobs = _Step.top_k(history[span], top_k)
        return Rollout(
            prompt_index=row.prompt_index,
            prompt_ids=list(row.prompt),
            response_ids=tokens[span].tolist(),
            logprobs=_Step.logprob(history[span]).tolist(),
            finish_reason="stop" if stopped else "length",
            top_k_ids=top_ids.tolist() if top_k else None,
            top_k_logprobs=top_logprobs.tolist() if top_k else None,
        )


class _Step:
    """Layout of one step's broadcast record per row, float64 so that one broadcast carries
    token ids exactly alongside log-probs: [token, logprob, top-K ids..., top-K log-probs...]."""

    @staticmethod
    def width(top_k: int) -> int:
        return 2 + 2 * top_k

    @staticmethod
    def sample(logits: torch.Tensor, sampling: SamplingParams,
               generators: list[torch.Generator]) -> torch.Tensor:
        logprobs = sampling_logprobs(logits, sampling.temperature)
        ids = choose_tokens(logprobs, sampling, generators)[:, None]
        columns = [ids, logprobs.gather(-1, ids)]
        if sampling.return_top_k:
            top = torch.topk(logprobs, sampling.return_top_k, dim=-1)
            columns += [top.indices, top.values]
        return torch.cat([column.double() for column in columns], dim=-1)

    @staticmethod
    def logprob(records: torch.Tensor) -> torch.Tensor:
        return records[:, 1].float()

    @staticmethod
    def top_k(records: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return records[:, 2:2 + top_k].long(), records[:, 2 + top_k:].float()


class _CachedForward:
    """Feeds each step's new tokens through every pipeline stage, extending the KV caches.

    Returns the real-vocabulary logits of each row's last fed position on the last pipeline
    stage, None elsewhere.
    """

    def __init__(self, chunks: list[torch.nn.Module], rows: int, max_length: int,
                 num_microbatches: int, vocab_size: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.chunks = chunks
        self.vocab_size = vocab_size
        self.contexts = [StaticInferenceContext(rows // num_microbatches, max_length)
                         for _ in range(num_microbatches)]

    def __call__(self, new_ids: torch.Tensor) -> torch.Tensor | None:
        microbatches = [
            # Megatron's inference path insists on logits gathered over TP; it only
            # materialises the last position, so that is [rows, 1, padded vocab].
            {"input_ids": ids, "model_kwargs": {"inference_context": context,
                                                "runtime_gather_output": True}}
            for ids, context in zip(new_ids.chunk(len(self.contexts)), self.contexts)]
        outputs = forward_outputs(self.chunks, microbatches, self._last_logits)
        for context in self.contexts:
            context.sequence_len_offset += new_ids.shape[1]
        return torch.cat(outputs) if outputs else None

    def _last_logits(self, output: torch.Tensor, microbatch: dict) -> torch.Tensor:
        # Padded vocabulary entries are cut here, so they can never be sampled.
        return output[:, -1, :self.vocab_size].float()


def _broadcast_from_sampler(step: torch.Tensor) -> torch.Tensor:
    """`step` as held by TP rank 0 of the last pipeline stage, on every rank of the replica."""
    from megatron.core import parallel_state as ps

    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    step = step.to(device)
    if ps.get_tensor_model_parallel_world_size() > 1 and ps.is_pipeline_last_stage():
        torch.distributed.broadcast(step, ps.get_tensor_model_parallel_src_rank(),
                                    group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(step, ps.get_pipeline_model_parallel_last_rank(),
                                    group=ps.get_pipeline_model_parallel_group())
    return step.cpu()


@contextlib.contextmanager
def _inference(chunks: list[torch.nn.Module]):
    """Eval mode (Megatron takes the KV-cache path only outside training) and no autograd;
    each chunk's training mode is restored afterwards."""
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)
