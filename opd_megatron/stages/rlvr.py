"""Stage `rlvr`: GRPO with verifiable rewards (the teacher-adaptation step of the recipe).

n samples per prompt, advantages normalized within each prompt's group, clipped ratio with
separate low/high clip, token-mean loss, optional KL to the initial weights (reference model).

π_old is the rollout engine's log-probs of the sampled tokens: no extra forward pass, and the
ratio measures the policy against what actually sampled. Each rollout batch is split into
`grpo.mini_batches` optimizer steps and passed over `grpo.epochs` times (PPO), so from the second
update on the ratio leaves 1 and the clip acts. With `rollout.tis_cap`, one forward pass gives
the trainer's log-probs at the sampling weights: they become π_old, and each token is weighted by
min(π_trainer / π_engine, cap) (truncated importance sampling, losses/importance.py).

The first update runs at the sampling weights, so its logits also give the engine/trainer
mismatch metrics (offpolicy.py). Dynamic sampling and overlong shaping: dynamic_sampling.py.
"""
from __future__ import annotations

import torch

from opd_megatron.losses import grpo_policy_loss
from opd_megatron.losses.importance import truncated_is_weights
from opd_megatron.stages.base import StageBase
from opd_megatron.stages.dynamic_sampling import Draw, fill_batch, overlong_penalty
from opd_megatron.stages.offpolicy import mismatch_metrics, mismatch_sums, tis_metrics, tis_sums
from opd_megatron.stages.replica_rewards import ReplicaScorer
from opd_megatron.stages.rollouts import (
    decode,
    generate_rollouts,
    response_diagnostics,
    rollout_batch,
    token_logprobs,
)
from opd_megatron.stages.timing import phase

POLICY_METRICS = ("clip_fraction", "ratio_mean", "approx_kl", "entropy", "ref_kl")


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages: reward minus its group mean (over consecutive `group_size` entries),
    divided by the group std when `normalize_std`."""
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (groups.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centered.reshape(-1)


def merge_update_infos(infos: list[dict]) -> dict:
    """One step's optimizer numbers from its updates: the first update's lr, the mean grad norm,
    the number of skipped updates."""
    return {**infos[-1], "lr": infos[0]["lr"],
            "grad_norm": sum(i["grad_norm"] for i in infos) / len(infos),
            "skipped_nonfinite": sum(i["skipped_nonfinite"] for i in infos)}


class RLVRStage(StageBase):
    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.scorer = ReplicaScorer(cfg, cfg.grpo.reward)
        self.reference = None
        if cfg.grpo.kl_coef > 0:
            self.reference = ctx.frozen_student_copy()

    def _draw(self, step: int, draw: int) -> Draw:
        ctx, cfg = self.ctx, self.ctx.cfg
        g = cfg.grpo
        examples = self.next_examples()
        rollouts = generate_rollouts(ctx, examples, step, draw)
        per_rollout = [examples[r.prompt_index] for r in rollouts]
        scored = self.scorer(decode(ctx.tokenizer, rollouts), per_rollout)
        scores = torch.tensor(scored.scores, dtype=torch.float32)
        lengths = torch.tensor([len(r.response_ids) for r in rollouts])
        shaped = scores + overlong_penalty(lengths, cfg.rollout.max_new_tokens, g.overlong_buffer,
                                           g.overlong_penalty)
        return Draw(per_rollout, rollouts, shaped.tolist(), num_correct=int((scores > 0.5).sum()),
                    num_errors=scored.num_errors, num_timeouts=scored.num_timeouts)

    def step(self, step: int) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg
        g, n, mbs = cfg.grpo, cfg.rollout.samples_per_prompt, cfg.trainer.micro_batch_size
        filled = fill_batch(lambda draw: self._draw(step, draw), ctx.per_rank_batch, n,
                            dynamic=g.dynamic_sampling, max_draws=g.dynamic_sampling_max_draws)
        batch = rollout_batch(ctx.tokenizer, filled.examples, filled.rollouts, mbs)
        advantages = group_advantages(torch.tensor(filled.rewards), n, g.normalize_std)
        vocab, temp = ctx.arch.vocab_size, cfg.rollout.temperature or 1.0
        with phase("reference"):
            trainer_old = (token_logprobs(ctx.model.chunks, batch.microbatches, vocab, temp)
                           if cfg.rollout.tis_cap else [])
            ref = (token_logprobs(self.reference, batch.microbatches, vocab, temp)
                   if self.reference is not None else [])
        for index, mb in enumerate(batch.microbatches):
            rows = slice(index * mbs, (index + 1) * mbs)
            mb["advantages"] = advantages[rows]
            if g.overlong_filter:
                truncated = torch.tensor([r.finish_reason == "length"
                                          for r in batch.rollouts[rows]])
                mb["loss_mask"] = mb["loss_mask"] * (~truncated)[:, None]
            mb["old_logprobs"] = mb["engine_logprobs"]
            if trainer_old:
                mb["old_logprobs"] = trainer_old[index]
                mb["tis_weights"] = truncated_is_weights(trainer_old[index], mb["engine_logprobs"],
                                                         cfg.rollout.tis_cap)
            if ref:
                mb["ref_logprobs"] = ref[index]
        at_sampling_weights = True

        def loss_fn(logits, mb):
            num_tokens = mb["loss_mask"].sum()
            loss_sum, m = grpo_policy_loss(
                logits, mb["labels"], mb["old_logprobs"], mb["advantages"], mb["loss_mask"],
                clip_low=g.clip_low, clip_high=g.clip_high, ref_logprobs=mb.get("ref_logprobs"),
                kl_coef=g.kl_coef, tis_weights=mb.get("tis_weights"), temperature=temp,
                num_tokens=1.0, vocab_size=vocab)
            out = {"loss_sum": loss_sum.detach(), "tokens": num_tokens,
                   **{k: v.detach() for k, v in m.items()}}
            if at_sampling_weights:
                out.update(mismatch_sums(logits, mb["labels"], mb["engine_logprobs"],
                                         mb["loss_mask"], vocab, temp))
            return loss_sum, num_tokens, out

        updates, infos = [], []
        parts = _split(batch.microbatches, g.mini_batches)
        with phase("train"):
            for _ in range(g.epochs):
                for part in parts:
                    outputs, info = ctx.model.train_step(part, loss_fn)
                    updates += outputs
                    infos.append(info)
                    at_sampling_weights = False
        metrics = self.step_metrics(updates, merge_update_infos(infos), averaged=POLICY_METRICS,
                                    maxed=("ratio_max",))
        if "loss" in metrics:
            metrics["tokens"] = float(sum(mb["loss_mask"].sum() for mb in batch.microbatches))
            metrics.update(filled.stats)
            metrics.update(mismatch_metrics(updates))
            metrics.update(tis_metrics([tis_sums(mb["tis_weights"], mb["loss_mask"])
                                        for mb in batch.microbatches if "tis_weights" in mb]))
            metrics.update(response_diagnostics(batch))
        return metrics


def _split(microbatches: list[dict], parts: int) -> list[list[dict]]:
    size = len(microbatches) // parts
    return [microbatches[i * size:(i + 1) * size] for i in range(parts)]
