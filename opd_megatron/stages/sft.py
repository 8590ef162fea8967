"""Stage `sft`: masked cross-entropy on response tokens (padded sequences)."""
from __future__ import annotations

import torch

from opd_megatron.data.dataset import load_sft_dataset
from opd_megatron.data.encoding import encode_sft
from opd_megatron.data.sampler import BatchSampler
from opd_megatron.losses import vocab_parallel_cross_entropy_loss
from opd_megatron.stages.batching import shifted_microbatches
from opd_megatron.stages.context import StageContext
from opd_megatron.stages.evaluate import Evaluator
from opd_megatron.stages.loop import is_metrics_reporter


class SFTStage:
    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        cfg = ctx.cfg
        self.dataset = load_sft_dataset(cfg.data.train_path, skip_bad_rows=cfg.data.skip_bad_rows)
        self.sampler = BatchSampler(len(self.dataset), ctx.per_rank_batch, seed=cfg.seed,
                                    dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
        self.evaluator = Evaluator(ctx)

    def step(self, step: int) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg
        seqs, masks = [], []
        for index in self.sampler.next_batch():
            ids, mask = encode_sft(ctx.tokenizer, self.dataset[index])
            seqs.append(ids[:cfg.data.max_seq_length])
            masks.append(mask[:cfg.data.max_seq_length])
        microbatches = shifted_microbatches(seqs, masks, cfg.trainer.micro_batch_size,
                                            ctx.tokenizer.pad_token_id)
        vocab = ctx.arch.vocab_size

        def loss_fn(logits, mb):
            num_tokens = mb["loss_mask"].sum()
            loss_sum = vocab_parallel_cross_entropy_loss(logits, mb["labels"], mb["loss_mask"],
                                                         num_tokens=1.0, vocab_size=vocab)
            return loss_sum, num_tokens, {"loss_sum": loss_sum.detach(),
                                          "tokens": num_tokens.detach()}

        outputs, info = ctx.model.train_step(microbatches, loss_fn)
        metrics = {"lr": info["lr"], "grad_norm": info["grad_norm"],
                   "skipped_nonfinite": float(info["skipped_nonfinite"])}
        if outputs and is_metrics_reporter():
            tokens = sum(float(o["tokens"]) for o in outputs)
            metrics["loss"] = sum(float(o["loss_sum"]) for o in outputs) / max(tokens, 1.0)
            metrics["tokens"] = tokens
            metrics["skipped_rows"] = float(self.dataset.num_skipped)
        return metrics

    def evaluate(self) -> dict[str, float]:
        return self.evaluator.run()

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
