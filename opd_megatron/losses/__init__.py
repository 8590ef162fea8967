"""Vocab-parallel losses: distillation (OPD/OPSD), GRPO policy loss, SFT cross-entropy.

All take this rank's vocabulary shard of the logits and never gather the full vocabulary. The
per-token losses are reduced with `token_mean` by every stage (see aggregate.py).
"""
from opd_megatron.losses.aggregate import sequence_mean, token_mean
from opd_megatron.losses.distill import METRICS, SUPPORTS, vocab_parallel_distill_loss
from opd_megatron.losses.distill_objectives import OBJECTIVES
from opd_megatron.losses.grpo import grpo_policy_loss
from opd_megatron.losses.logprobs import vocab_parallel_logprobs
from opd_megatron.losses.sft import vocab_parallel_cross_entropy_loss

LOSSES = tuple(OBJECTIVES)

__all__ = [
    "LOSSES",
    "METRICS",
    "SUPPORTS",
    "grpo_policy_loss",
    "sequence_mean",
    "token_mean",
    "vocab_parallel_cross_entropy_loss",
    "vocab_parallel_distill_loss",
    "vocab_parallel_logprobs",
]
