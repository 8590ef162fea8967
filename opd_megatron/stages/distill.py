"""Stages `opd` and `opsd`: the student samples, a teacher scores the exact student tokens, the
student trains on `vocab_parallel_distill_loss` (docs/LOSSES.md).

- opd: the teacher is its own checkpoint (`teacher.megatron_dir`), same tokenizer, any size.
- opsd: the teacher is the student's frozen initial weights (`teacher.source: initial`) or its
  live weights (`live`), conditioned on privileged information in its prompt (`teacher.pi`).
  OPD with `teacher.pi` set is the paper's OPD+PI arm.

Teacher and student share the parallel layout, so teacher logits stay vocab-sharded exactly like
the student's and teacher log-probs on the student's support are exact. The teacher builds no
optimizer or gradient buffers.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from opd_megatron.data.encoding import encode_prompt
from opd_megatron.data.privileged import PIConfig
from opd_megatron.data.shapes import ShapeContract
from opd_megatron.losses import METRICS, vocab_parallel_distill_loss, vocab_parallel_logprobs
from opd_megatron.losses.importance import truncated_is_weights
from opd_megatron.runtime.distributed import current_device
from opd_megatron.stages.alignment import gather_positions, response_index
from opd_megatron.stages.batching import shifted_microbatches
from opd_megatron.stages.base import StageBase
from opd_megatron.stages.offpolicy import mismatch_metrics, mismatch_sums, tis_metrics, tis_sums
from opd_megatron.stages.replica_rewards import ReplicaScorer
from opd_megatron.stages.rlvr import group_advantages
from opd_megatron.stages.rollouts import response_diagnostics, sample_rollouts
from opd_megatron.stages.timing import phase
from opd_megatron.trainer.schedule import forward_outputs


class TeacherHealthError(RuntimeError):
    pass


class TokenizerMismatchError(ValueError):
    pass


def tokenizer_fingerprint(directory: str | Path) -> str:
    """Hash of the files that define a tokenizer's ids (tokenizer.json or tokenizer.model)."""
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json"):
        path = Path(directory) / name
        if path.is_file():
            return f"{name}:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    raise TokenizerMismatchError(f"{directory}: no tokenizer.json, tokenizer.model or vocab.json")


def check_teacher_health(teacher_logprobs: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> str:
    """'' if healthy, else why the teacher's log-probs on sampled tokens look broken.

    A teacher that lost its weights gives the same log-prob everywhere, or -ln(V) (uniform).
    """
    values = teacher_logprobs[mask > 0]
    if values.numel() < 2:
        return ""
    uniform = -math.log(vocab_size)
    if (values - uniform).abs().max() < 1e-3:
        return f"teacher log-probs all equal -ln(V) = {uniform:.4f}: a uniform teacher (lost weights?)"
    if values.std() < 1e-6:
        return f"teacher log-probs are constant ({values[0].item():.4f}) on every sampled token"
    return ""


def teacher_microbatches(tokenizer, pi: PIConfig | None, batch, micro_batch_size: int,
                         shapes: ShapeContract = ShapeContract()) -> list[dict]:
    """The teacher's view of a rollout batch: its own prompt (with PI, if any) + the student's
    exact response tokens, with the lengths `response_index` needs."""
    seqs, masks, prompt_lens = [], [], []
    for example, rollout in zip(batch.examples, batch.rollouts):
        prompt = encode_prompt(tokenizer, example, pi)
        seqs.append(prompt + rollout.response_ids)
        masks.append([0] * len(prompt) + [1] * len(rollout.response_ids))
        prompt_lens.append(len(prompt))
    return shifted_microbatches(
        seqs, masks, micro_batch_size, tokenizer.pad_token_id,
        extra={"prompt_len": torch.tensor(prompt_lens),
               "response_len": torch.tensor([len(r.response_ids) for r in batch.rollouts])},
        shapes=shapes)


def student_microbatches(batch, micro_batch_size: int) -> list[dict]:
    """The rollout batch's student micro-batches, annotated with prompt and response lengths."""
    prompt = torch.tensor([len(r.prompt_ids) for r in batch.rollouts])
    response = torch.tensor([len(r.response_ids) for r in batch.rollouts])
    for index, mb in enumerate(batch.microbatches):
        rows = slice(index * micro_batch_size, (index + 1) * micro_batch_size)
        mb["prompt_len"], mb["response_len"] = prompt[rows], response[rows]
    return batch.microbatches


class DistillStage(StageBase):
    def __init__(self, ctx):
        super().__init__(ctx)
        cfg = ctx.cfg
        pi = cfg.teacher.pi
        self.pi = None if pi.mode == "none" else PIConfig(mode=pi.mode, system_prompt=pi.system_prompt,
                                                          template=pi.template)
        self.scorer = ReplicaScorer(cfg, cfg.grpo.reward) if cfg.distill.reward_weight > 0 else None
        self.teacher = self._build_teacher()

    def _build_teacher(self) -> list[torch.nn.Module]:
        ctx, cfg = self.ctx, self.ctx.cfg
        from opd_megatron.trainer.engine import build_frozen

        if cfg.teacher.source == "live":
            return ctx.model.chunks
        if cfg.teacher.source == "initial":
            return ctx.frozen_student_copy()
        from opd_megatron.checkpoint.megatron_dist import load_model, read_arch
        from opd_megatron.config.validate import validate_layout

        teacher_dir = cfg.teacher.megatron_dir
        arch = read_arch(teacher_dir)
        if arch.vocab_size != ctx.arch.vocab_size:
            raise TokenizerMismatchError(
                f"teacher.megatron_dir={teacher_dir}: vocab_size={arch.vocab_size}, the "
                f"student's is {ctx.arch.vocab_size}; OPD needs the same token ids")
        if tokenizer_fingerprint(teacher_dir) != tokenizer_fingerprint(ctx.tokenizer_dir):
            raise TokenizerMismatchError(
                f"teacher.megatron_dir={teacher_dir}: its tokenizer differs from the student's "
                f"({ctx.tokenizer_dir}); OPD needs the same token ids")
        validate_layout(cfg.parallel, arch, torch.distributed.get_world_size(),
                        cuda=torch.cuda.is_available(), where="teacher.megatron_dir")
        chunks = build_frozen(arch, cfg.parallel, cfg.precision, cfg.model.make_vocab_size_divisible_by)
        load_model(chunks, teacher_dir)
        return chunks

    # --- one step -----------------------------------------------------------------------------

    def _teacher_logits(self, teacher_mbs: list[dict]) -> list[torch.Tensor]:
        def response_logits(logits, mb):
            index, _ = response_index(mb["prompt_len"], mb["response_len"], logits.shape[1])
            return gather_positions(logits, index)

        return forward_outputs(self.teacher, teacher_mbs, response_logits)

    def _support_ids(self, rollouts) -> torch.Tensor:
        k = self.ctx.cfg.distill.top_k
        width = max(len(r.response_ids) for r in rollouts)
        # Positions past a response are masked; distinct filler ids keep the support valid.
        ids = torch.arange(k).repeat(len(rollouts), width, 1)
        for row, rollout in enumerate(rollouts):
            if rollout.top_k_ids:
                ids[row, :len(rollout.top_k_ids)] = torch.tensor([p[:k] for p in rollout.top_k_ids])
        return ids

    def step(self, step: int) -> dict[str, float]:
        ctx, cfg = self.ctx, self.ctx.cfg
        d, vocab = cfg.distill, ctx.arch.vocab_size
        examples = self.next_examples()
        batch = sample_rollouts(ctx, examples, step)
        mbs = cfg.trainer.micro_batch_size
        student_mbs = student_microbatches(batch, mbs)
        with phase("teacher"):
            teacher_logits = self._teacher_logits(
                teacher_microbatches(ctx.tokenizer, self.pi, batch, mbs, ctx.shapes))
        support = self._support_ids(batch.rollouts) if d.support == "given" else None
        advantages = None
        rewards = scored = None
        if self.scorer is not None:
            scored = self.scorer(batch.texts, batch.examples)
            rewards = torch.tensor(scored.scores)
            n = cfg.rollout.samples_per_prompt
            advantages = (group_advantages(rewards, n, cfg.grpo.normalize_std) if n > 1
                          else rewards - rewards.mean())
        for index, mb in enumerate(student_mbs):
            if teacher_logits:
                mb["teacher_logits"] = teacher_logits[index]
            if support is not None:
                mb["support_ids"] = support[index * mbs:(index + 1) * mbs]
            if advantages is not None:
                mb["advantages"] = advantages[index * mbs:(index + 1) * mbs]
        health = self._check_teacher(student_mbs, teacher_logits, vocab)
        sample_temperature = cfg.rollout.temperature or 1.0
        tis_cap = cfg.rollout.tis_cap

        def loss_fn(logits, mb):
            index, mask = response_index(mb["prompt_len"], mb["response_len"], logits.shape[1])
            student = gather_positions(logits, index)
            sampled = gather_positions(mb["labels"], index)
            support_ids = mb.get("support_ids")
            if support_ids is not None:
                support_ids = support_ids[:, :student.shape[1]]
            engine = gather_positions(mb["engine_logprobs"], index)
            # One update per rollout batch: these logits are the weights the engine sampled with.
            extra = mismatch_sums(student, sampled, engine, mask, vocab, sample_temperature)
            weights = torch.ones_like(mask)
            if tis_cap:
                trainer = vocab_parallel_logprobs(student.detach(), sampled, vocab_size=vocab,
                                                  temperature=sample_temperature)
                weights = truncated_is_weights(trainer, engine, tis_cap)
                extra.update(tis_sums(weights, mask))
            per_token, m = vocab_parallel_distill_loss(
                student, mb["teacher_logits"], loss=d.loss, top_k=d.top_k, support=d.support,
                temperature=d.temperature, loss_mask=mask, sampled_ids=sampled,
                support_ids=support_ids, beta=d.beta, vocab_size=vocab,
                with_metrics=step % d.metrics_every == 0)
            # TIS (sampled_pg only, validated): the sampled-token estimator is reweighted.
            loss_sum = (per_token * weights).sum()
            if "advantages" in mb:
                logp = vocab_parallel_logprobs(student, sampled, vocab_size=vocab,
                                               temperature=d.temperature)
                # exp(logp - sg(logp)) is 1 in value with gradient grad(logp): REINFORCE.
                policy = -(mb["advantages"][:, None] * torch.exp(logp - logp.detach())
                           * weights * mask).sum()
                loss_sum = loss_sum + d.reward_weight * policy
                extra["policy_loss_sum"] = policy.detach()
            return loss_sum, mask.sum(), {"loss_sum": loss_sum.detach(), "tokens": mask.sum(),
                                          **{k: v.detach() for k, v in m.items()}, **extra}

        with phase("train"):
            outputs, info = ctx.model.train_step(student_mbs, loss_fn)
        metrics = self.step_metrics(outputs, info, averaged=tuple(METRICS))
        if "loss" in metrics:
            metrics.update(health)
            metrics.update(response_diagnostics(batch))
            metrics.update(mismatch_metrics(outputs))
            metrics.update(tis_metrics(outputs))
            metrics.update(batch.refit_metrics)
            if rewards is not None:
                metrics["reward"] = float(rewards.mean())
                metrics["reward/errors"] = float(scored.num_errors)
                metrics["reward/timeouts"] = float(scored.num_timeouts)
            student_lp = [lp for r in batch.rollouts for lp in r.logprobs]
            if student_lp and "teacher_logprob" in metrics:
                metrics["student_logprob"] = sum(student_lp) / len(student_lp)
                metrics["teacher_student_logprob_gap"] = (metrics["teacher_logprob"]
                                                          - metrics["student_logprob"])
        return metrics

    def _check_teacher(self, student_mbs, teacher_logits, vocab) -> dict[str, float]:
        """Teacher log-prob and teacher-student gap on sampled tokens; stops on a broken teacher."""
        problem, stats = "", {}
        if teacher_logits:
            t_all, m_all = [], []
            for mb, t_logits in zip(student_mbs, teacher_logits):
                index, mask = response_index(mb["prompt_len"], mb["response_len"],
                                             mb["labels"].shape[1])
                sampled = gather_positions(mb["labels"], index)
                t_all.append(vocab_parallel_logprobs(t_logits, sampled, vocab_size=vocab,
                                                     temperature=self.ctx.cfg.teacher.temperature)[mask > 0])
                m_all.append(mask[mask > 0])
            t_lp = torch.cat(t_all)
            problem = check_teacher_health(t_lp, torch.cat(m_all), vocab)
            stats["teacher_logprob"] = float(t_lp.mean()) if t_lp.numel() else 0.0
        flag = torch.tensor([1.0 if problem else 0.0], device=current_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            raise TeacherHealthError(problem or "teacher health check failed on another rank")
        return stats
