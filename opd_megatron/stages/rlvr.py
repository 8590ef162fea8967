"""Stage `rlvr`: GRPO with verifiable rewards (the teacher-adaptation step of the recipe).

n samples per prompt, advantages normalized within each prompt's group, clipped ratio with
separate low/high clip, token-mean loss, optional KL to the initial weights (reference model).
One optimizer step per rollout batch, so the old log-probs are those of the sampling weights.
"""
from __future__ import annotations

import torch

from opd_megatron.losses import grpo_policy_loss
from opd_megatron.rewards.scoring import RewardScorer
from opd_megatron.stages.base import StageBase
from opd_megatron.stages.rollouts import response_diagnostics, sample_rollouts, token_logprobs


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus its group mean (over consecutive `group_size` entries),
    divided by the group std when `normalize_std`."""
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (groups.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centered.reshape(-1)


class RLVRStage(StageBase):
    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.scorer = RewardScorer(cfg.grpo.reward, on_error=cfg.grpo.reward_on_error)
        self.reference = None
        if cfg.grpo.kl_coef > 0:
            self.reference = ctx.frozen_student_copy()

    def step(self, step: int) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg
        examples = self.next_examples()
        batch = sample_rollouts(ctx, examples, step)
        scored = self.scorer(batch.texts, batch.examples)
        rewards = torch.tensor(scored.scores, dtype=torch.float32)
        advantages = group_advantages(rewards, cfg.rollout.samples_per_prompt,
                                      cfg.grpo.normalize_std)
        vocab, temp = ctx.arch.vocab_size, cfg.rollout.temperature or 1.0
        old = token_logprobs(ctx.model.chunks, batch.microbatches, vocab, temp)
        ref = (token_logprobs(self.reference, batch.microbatches, vocab, temp)
               if self.reference is not None else [])
        mbs = cfg.trainer.micro_batch_size
        for index, mb in enumerate(batch.microbatches):
            mb["advantages"] = advantages[index * mbs:(index + 1) * mbs]
            if old:
                mb["old_logprobs"] = old[index]
            if ref:
                mb["ref_logprobs"] = ref[index]
        g = cfg.grpo

        def loss_fn(logits, mb):
            num_tokens = mb["loss_mask"].sum()
            loss_sum, m = grpo_policy_loss(
                logits, mb["labels"], mb["old_logprobs"], mb["advantages"], mb["loss_mask"],
                clip_low=g.clip_low, clip_high=g.clip_high, ref_logprobs=mb.get("ref_logprobs"),
                kl_coef=g.kl_coef, temperature=temp, num_tokens=1.0, vocab_size=vocab)
            return loss_sum, num_tokens, {"loss_sum": loss_sum.detach(), "tokens": num_tokens,
                                          **{k: v.detach() for k, v in m.items()}}

        outputs, info = ctx.model.train_step(batch.microbatches, loss_fn)
        metrics = self.step_metrics(outputs, info,
                               averaged=("clip_fraction", "ratio_mean", "entropy", "ref_kl"))
        if "loss" in metrics:
            metrics["reward"] = float(rewards.mean())
            metrics["accuracy"] = float((rewards > 0.5).float().mean())
            metrics["reward_errors"] = float(scored.num_errors)
            metrics.update(response_diagnostics(batch))
            metrics.update(batch.refit_metrics)
        return metrics
