"""Stage `sft`: masked cross-entropy on response tokens, padded or packed (`data.packing`)."""
from __future__ import annotations

import torch

from opd_megatron.data.dataset import load_sft_dataset
from opd_megatron.data.encoding import encode_sft
from opd_megatron.data.overlong import keep_last
from opd_megatron.data.packing import pack_sequences, segment_causal_mask
from opd_megatron.losses import vocab_parallel_cross_entropy_loss
from opd_megatron.stages.base import StageBase
from opd_megatron.stages.batching import shifted_microbatches
from opd_megatron.stages.timing import phase


def packed_microbatches(seqs: list[list[int]], masks: list[list[int]], micro_batch_size: int,
                        seq_len: int, pad_id: int) -> list[dict]:
    """First-fit packed rows, shifted like `shifted_microbatches`, each segment attending only
    to itself; rows are padded with empty ones to whole micro-batches."""
    packed = pack_sequences(list(zip(seqs, masks)), seq_len, pad_id)
    rows = packed.tokens.shape[0]
    extra = -rows % micro_batch_size
    tokens = torch.cat([packed.tokens, torch.full((extra, seq_len), pad_id)])
    loss_mask = torch.cat([packed.loss_mask, torch.zeros(extra, seq_len, dtype=torch.long)])
    positions = torch.cat([packed.position_ids, torch.zeros(extra, seq_len, dtype=torch.long)])
    segments = torch.cat([packed.segment_ids, torch.zeros(extra, seq_len, dtype=torch.long)])
    blocked = ~segment_causal_mask(segments[:, :-1])[:, None]
    return [{"input_ids": tokens[r, :-1], "labels": tokens[r, 1:],
             "loss_mask": loss_mask[r, 1:].float(), "position_ids": positions[r, :-1],
             "attention_mask": blocked[r]}
            for r in (slice(i, i + micro_batch_size) for i in range(0, len(tokens), micro_batch_size))]


class SFTStage(StageBase):
    load_dataset = staticmethod(load_sft_dataset)
    measured = "prompt + response"

    def __init__(self, ctx):
        super().__init__(ctx)
        if ctx.cfg.data.packing and torch.cuda.is_available():
            from opd_megatron.config.loader import ConfigError

            raise ConfigError("data.packing=true needs the local layer spec's explicit masks; "
                              "GPU (Transformer Engine) runs use padded batches")

    def sequence_length(self, example) -> int:
        return len(encode_sft(self.ctx.tokenizer, example)[0])

    def step(self, step: int) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg
        seqs, masks = [], []
        for example in self.next_examples():
            ids, mask = encode_sft(ctx.tokenizer, example)
            # Over-long examples were skipped or refused at load unless truncate_left is chosen.
            seqs.append(keep_last(ids, cfg.data.max_seq_length))
            masks.append(keep_last(mask, cfg.data.max_seq_length))
        if cfg.data.packing:
            microbatches = packed_microbatches(seqs, masks, cfg.trainer.micro_batch_size,
                                               cfg.data.max_seq_length, ctx.tokenizer.pad_token_id)
        else:
            microbatches = shifted_microbatches(seqs, masks, cfg.trainer.micro_batch_size,
                                                ctx.tokenizer.pad_token_id, shapes=ctx.shapes)
        vocab = ctx.arch.vocab_size

        def loss_fn(logits, mb):
            num_tokens = mb["loss_mask"].sum()
            loss_sum = vocab_parallel_cross_entropy_loss(logits, mb["labels"], mb["loss_mask"],
                                                         num_tokens=1.0, vocab_size=vocab)
            return loss_sum, num_tokens, {"loss_sum": loss_sum.detach(),
                                          "tokens": num_tokens.detach()}

        with phase("train"):
            outputs, info = ctx.model.train_step(microbatches, loss_fn)
        return self.step_metrics(outputs, info)
