"""Stage `sft`: masked cross-entropy on response tokens (padded sequences)."""
from __future__ import annotations

import torch

from opd_megatron.data.dataset import load_sft_dataset
from opd_megatron.data.encoding import encode_sft
from opd_megatron.losses import vocab_parallel_cross_entropy_loss
from opd_megatron.stages.base import StageBase
from opd_megatron.stages.batching import shifted_microbatches


class SFTStage(StageBase):
    load_dataset = staticmethod(load_sft_dataset)

    def step(self, step: int) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg
        seqs, masks = [], []
        for example in self.next_examples():
            ids, mask = encode_sft(ctx.tokenizer, example)
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
        return self.step_metrics(outputs, info)
