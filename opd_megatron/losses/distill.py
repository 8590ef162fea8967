"""Vocab-parallel distillation loss: one chunked pass over the vocabulary shards.

Per chunk of positions, with z = student / T and t = teacher / T on this rank's real columns:
  1. local top-K of z and of t, gathered (K * tp candidates) -> global top-K; its first column is
     the global max, so no separate max all-reduce is needed;
  2. exp(z - max), exp(t - max) and their full-vocabulary sums; z and t at the support ids (each
     rank reads the ids in its shard); one all-reduce of all of these per-position columns;
  3. only for jsd or when sampled ids are given: sums that need the normalised p and q (the JSD
     terms, the teacher's rank of the sampled token), one more all-reduce.
Everything after that is per position (distill_objectives.py). The metrics come from the same pass.

Backward recomputes log p (and log q where the objective's dense gradient needs it) chunk by chunk
from the saved per-position normalisers and writes straight into the gradient; it needs no
communication. Extra memory: the gradient shard plus a few chunk buffers (see vocab_parallel.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from opd_megatron.losses._comm import all_reduce_columns, resolve_tp_group
from opd_megatron.losses.distill_objectives import OBJECTIVES, Objective, PositionStats
from opd_megatron.losses.vocab_parallel import (
    VocabShard,
    Workspace,
    check_temperature,
    chunk_ranges,
    compute_dtype,
    global_topk,
    load_scaled,
    row_dot,
)

SUPPORTS = ("student", "teacher", "given")
METRICS = ("topk_overlap", "student_entropy", "kl_estimate", "student_support_mass",
           "teacher_support_mass", "teacher_rank_of_sampled")


@dataclass(frozen=True)
class _Plan:
    objective: Objective
    support: str
    top_k: int
    temperature: float
    beta: float
    shard: VocabShard
    chunk_size: int | None
    mask: torch.Tensor  # [N] loss weights; 0 = position excluded
    sampled_ids: torch.Tensor | None  # [N]
    support_ids: torch.Tensor | None  # [N, K]

    def needs(self, what: str) -> bool:
        return what in self.objective.needs


def vocab_parallel_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                                loss: str, top_k: int = 20, support: str = "student",
                                temperature: float = 1.0, loss_mask: torch.Tensor | None = None,
                                sampled_ids: torch.Tensor | None = None,
                                support_ids: torch.Tensor | None = None, beta: float = 0.5,
                                tp_group=None, vocab_size: int | None = None,
                                chunk_size: int | None = None):
    """Per-token distillation loss from vocab-sharded student and teacher logits.

    student_logits, teacher_logits: this rank's shard [batch, seq, Vp/tp] (Megatron's contiguous
        vocabulary partition); entries >= vocab_size are padding and are ignored. The teacher is
        detached.
    loss: one of OBJECTIVES (docs/LOSSES.md); the stages default to `topk_rkl_sg`.
    support: "student" (the student's global top-K, chosen without gradient), "teacher", or
        "given" (`support_ids` [batch, seq, top_k] global ids, distinct per position).
    sampled_ids: [batch, seq] tokens of the rollout; needed by `sampled_pg`, and enables the
        `teacher_rank_of_sampled` metric (1 = the teacher's top token).
    loss_mask: [batch, seq] weights (0 excludes a position); the loss is multiplied by it.
    tp_group: None = megatron's tensor-parallel group when initialised, else no communication.
    chunk_size: positions per chunk; None picks it from a fixed buffer budget.

    Returns (per_token_loss [batch, seq], metrics): the loss is in fp32 (fp64 for fp64 logits);
    metrics are detached scalars, means over positions with a non-zero mask.
    """
    plan = _make_plan(student_logits, teacher_logits, loss, top_k, support, temperature,
                      loss_mask, sampled_ids, support_ids, beta, tp_group, vocab_size, chunk_size)
    per_token, metric_values = _Distill.apply(student_logits, teacher_logits.detach(), plan)
    names = METRICS if plan.sampled_ids is not None else METRICS[:-1]
    return per_token, dict(zip(names, metric_values.unbind()))


def _make_plan(student, teacher, loss, top_k, support, temperature, loss_mask, sampled_ids,
               support_ids, beta, tp_group, vocab_size, chunk_size) -> _Plan:
    if loss not in OBJECTIVES:
        raise ValueError(f"loss={loss!r} is not one of {sorted(OBJECTIVES)}")
    if support not in SUPPORTS:
        raise ValueError(f"support={support!r} is not one of {SUPPORTS}")
    if student.shape != teacher.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher.shape)} differs from student_logits "
                         f"shape {tuple(student.shape)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    positions = student.shape[:-1]
    shard = VocabShard.of(student.shape[-1], vocab_size, resolve_tp_group(tp_group))
    if not 1 <= top_k <= shard.vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, vocab_size={shard.vocab_size}]")
    if loss_mask is None:
        mask = torch.ones(positions, dtype=compute_dtype(student.dtype), device=student.device)
    elif loss_mask.shape != positions:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} must be {tuple(positions)}")
    else:
        mask = loss_mask.to(compute_dtype(student.dtype))
    valid = mask != 0
    if sampled_ids is None and OBJECTIVES[loss].sparse_on == "sampled":
        raise ValueError(f"loss={loss!r} needs sampled_ids")
    if sampled_ids is not None:
        if sampled_ids.shape != positions:
            raise ValueError(f"sampled_ids shape {tuple(sampled_ids.shape)} must be "
                             f"{tuple(positions)}")
        # Masked positions may hold any id (padding, -100); they are never read.
        shard.check_ids("sampled_ids", sampled_ids[valid])
        sampled_ids = torch.where(valid, sampled_ids, 0).reshape(-1).long()
    if support == "given":
        if support_ids is None:
            raise ValueError("support='given' needs support_ids")
        if support_ids.shape != (*positions, top_k):
            raise ValueError(f"support_ids shape {tuple(support_ids.shape)} must be "
                             f"{(*positions, top_k)} (top_k={top_k})")
        shard.check_ids("support_ids", support_ids[valid])
        support_ids = torch.where(valid[..., None], support_ids, 0).reshape(-1, top_k).long()
    return _Plan(OBJECTIVES[loss], support, top_k, check_temperature(temperature), float(beta),
                 shard, chunk_size, mask.reshape(-1), sampled_ids, support_ids)


class _Distill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, plan: _Plan):
        shard, objective = plan.shard, plan.objective
        dtype = compute_dtype(student.dtype)
        s_rows = student.reshape(-1, shard.width)
        t_rows = teacher.reshape(-1, shard.width)
        num = s_rows.shape[0]
        ranges = chunk_ranges(num, shard.width, plan.chunk_size)
        ws = Workspace.for_chunks(ranges, shard, dtype, student.device)

        def new(*shape):
            return s_rows.new_zeros((num, *shape), dtype=dtype)

        value, lse_student, lse_teacher, shift = new(), new(), new(), new()
        sparse_ids = None
        if objective.sparse_on == "support":
            sparse, sparse_ids = new(plan.top_k), s_rows.new_zeros((num, plan.top_k),
                                                                  dtype=torch.long)
        elif objective.sparse_on == "sampled":
            sparse, sparse_ids = new(1), plan.sampled_ids[:, None]
        metrics = new(len(METRICS))
        for start, stop in ranges:
            terms, support, chunk_lse, chunk_metrics = _forward_chunk(
                plan, ws, s_rows[start:stop, :shard.valid], t_rows[start:stop, :shard.valid],
                slice(start, stop))
            keep = plan.mask[start:stop] != 0
            # Masked positions contribute exact zeros, whatever their logits held.
            value[start:stop] = torch.where(keep, terms.value * plan.mask[start:stop], 0.0)
            lse_student[start:stop], lse_teacher[start:stop] = chunk_lse
            if terms.shift is not None:
                shift[start:stop] = torch.where(keep, terms.shift, 0.0)
            if objective.sparse_on is not None:
                sparse[start:stop] = torch.where(keep[:, None], terms.sparse, 0.0)
            if objective.sparse_on == "support":
                sparse_ids[start:stop] = support
            metrics[start:stop] = chunk_metrics
        ctx.save_for_backward(student, teacher, lse_student, lse_teacher, shift,
                              *(() if sparse_ids is None else (sparse, sparse_ids)))
        ctx.plan, ctx.ranges = plan, ranges
        valid = plan.mask != 0
        metric_means = torch.where(valid[:, None], metrics, 0.0).sum(0) / valid.sum().clamp_min(1)
        if plan.sampled_ids is None:
            metric_means = metric_means[:-1]
        ctx.mark_non_differentiable(metric_means)
        return value.view(student.shape[:-1]), metric_means

    @staticmethod
    def backward(ctx, grad_value, _grad_metrics):
        plan, shard = ctx.plan, ctx.plan.shard
        student, teacher, lse_student, lse_teacher, shift, *sparse_terms = ctx.saved_tensors
        # Per-position weight of dL/dz; the 1/T turns it into dL/dlogits.
        weight = grad_value.reshape(-1).to(shift.dtype) * plan.mask / plan.temperature
        s_rows = student.reshape(-1, shard.width)
        t_rows = teacher.reshape(-1, shard.width)
        grad = torch.zeros(student.shape, dtype=student.dtype, device=student.device)
        grad_rows = grad.view(-1, shard.width)
        ws = Workspace.for_chunks(ctx.ranges, shard, shift.dtype, student.device)
        for start, stop in ctx.ranges:
            rows = slice(start, stop)
            g = _dense_grad(plan, ws, s_rows[rows, :shard.valid], t_rows[rows, :shard.valid],
                            lse_student[rows, None], lse_teacher[rows, None], shift[rows, None],
                            weight[rows, None])
            if sparse_terms:
                sparse, sparse_ids = sparse_terms
                shard.scatter_add_(g, sparse_ids[rows], sparse[rows] * weight[rows, None])
            grad_rows[rows, :shard.valid].copy_(g)
        return grad, None, None


def _forward_chunk(plan: _Plan, ws: Workspace, s_rows, t_rows, rows: slice):
    """(objective terms, support ids, (lse of z, lse of t), metrics [n, len(METRICS)])."""
    shard, k, n = plan.shard, plan.top_k, s_rows.shape[0]
    z = load_scaled(s_rows, ws("z", n), plan.temperature)
    t = load_scaled(t_rows, ws("t", n), plan.temperature)
    # Phase 1: global top-K of each side; column 0 is the max that stabilises exp.
    z_top, z_top_ids = global_topk(z, k, shard)
    t_top, t_top_ids = global_topk(t, k, shard)
    z.sub_(z_top[:, :1])
    t.sub_(t_top[:, :1])
    support = {"student": z_top_ids, "teacher": t_top_ids,
               "given": None if plan.support_ids is None else plan.support_ids[rows]}[plan.support]
    sampled = None if plan.sampled_ids is None else plan.sampled_ids[rows, None]

    # Phase 2: normalisers, full-vocabulary sums and the values on the support, one all-reduce.
    ez = torch.exp(z, out=ws("ez", n))
    et = torch.exp(t, out=ws("et", n))
    scratch = ws("scratch", n)
    sums = {"ez": ez.sum(dim=-1), "et": et.sum(dim=-1), "ez_z": row_dot(ez, z, scratch),
            "ez_t": row_dot(ez, t, scratch), "z_support": shard.gather(z, support),
            "t_support": shard.gather(t, support)}
    if plan.needs("fkl"):
        sums.update(et_t=row_dot(et, t, scratch), et_z=row_dot(et, z, scratch))
    if sampled is not None:
        sums.update(z_sampled=shard.gather(z, sampled)[:, 0],
                    t_sampled=shard.gather(t, sampled)[:, 0])
    sums = all_reduce_columns(sums, shard.group)
    log_zs, log_ts = sums["ez"].log(), sums["et"].log()
    mean_z, mean_t = sums["ez_z"] / sums["ez"], sums["ez_t"] / sums["ez"]  # E_p[z - max z], ...
    stats = PositionStats(
        logp_support=sums["z_support"] - log_zs[:, None],
        logq_support=sums["t_support"] - log_ts[:, None],
        support_in_teacher_topk=_isin_rows(support, t_top_ids),
        rkl=mean_z - log_zs - mean_t + log_ts, beta=plan.beta)
    if plan.needs("fkl"):
        stats.fkl = (sums["et_t"] - sums["et_z"]) / sums["et"] - log_ts + log_zs
    if sampled is not None:
        stats.logp_sampled = sums["z_sampled"] - log_zs
        stats.logq_sampled = sums["t_sampled"] - log_ts

    # Phase 3: what needs the normalised distributions or the sampled logit, one more all-reduce.
    late = {}
    if sampled is not None:
        late["above_sampled"] = torch.gt(t, sums["t_sampled"][:, None], out=scratch).sum(dim=-1)
    if plan.needs("jsd"):
        p, q = ez.div_(sums["ez"][:, None]), et.div_(sums["et"][:, None])
        logp, logq = z.sub_(log_zs[:, None]), t.sub_(log_ts[:, None])
        late["kl_pm"], late["kl_qm"] = _jsd_sums(plan.beta, ws, p, q, logp, logq)
    late = all_reduce_columns(late, shard.group)
    if plan.needs("jsd"):
        stats.kl_pm, stats.kl_qm = late["kl_pm"], late["kl_qm"]

    metrics = torch.stack([
        _isin_rows(z_top_ids, t_top_ids).sum(dim=-1).to(z.dtype) / k,
        log_zs - mean_z,  # entropy
        stats.rkl,
        stats.logp_support.exp().sum(dim=-1),
        stats.logq_support.exp().sum(dim=-1),
        late["above_sampled"] + 1 if sampled is not None else torch.zeros_like(log_zs),
    ], dim=-1)
    lse = (z_top[:, 0] + log_zs, t_top[:, 0] + log_ts)
    return plan.objective.terms(stats), support, lse, metrics


def _jsd_sums(beta, ws, p, q, logp, logq) -> tuple[torch.Tensor, torch.Tensor]:
    """This shard's part of (KL(p || m), KL(q || m)), m = beta q + (1 - beta) p."""
    n = p.shape[0]
    # m underflows to 0 only where p and q do too; clamping keeps 0 * log(..) at 0, not NaN.
    logm = torch.mul(p, 1 - beta, out=ws("scratch", n)).add_(q, alpha=beta)
    logm.clamp_min_(torch.finfo(logm.dtype).tiny).log_()
    diff = ws("diff", n)
    kl_pm = row_dot(p, torch.sub(logp, logm, out=diff), diff)
    kl_qm = row_dot(q, torch.sub(logq, logm, out=diff), diff)
    return kl_pm, kl_qm


def _dense_grad(plan: _Plan, ws: Workspace, s_rows, t_rows, lse_s, lse_t, shift, weight):
    """The dense part of dL/dlogits for one chunk (see distill_objectives.py), in a buffer."""
    n, dense = s_rows.shape[0], plan.objective.dense
    logp = load_scaled(s_rows, ws("logp", n), plan.temperature).sub_(lse_s)
    if dense is None:
        return logp.zero_()
    p = torch.exp(logp, out=ws("p", n))
    if dense == "p":
        return p.mul_(-shift * weight)
    logq = load_scaled(t_rows, ws("logq", n), plan.temperature).sub_(lse_t)
    if dense == "rkl":
        return logp.sub_(logq).sub_(shift).mul_(p).mul_(weight)
    if dense == "fkl":
        return p.sub_(logq.exp_()).mul_(weight)
    # jsd: log m = log(beta q + (1 - beta) p), clamped as in _jsd_sums.
    logm = logq.exp_().mul_(plan.beta).add_(p, alpha=1 - plan.beta)
    logm.clamp_min_(torch.finfo(logm.dtype).tiny).log_()
    return logp.sub_(logm).sub_(shift).mul_(p).mul_((1 - plan.beta) * weight)


def _isin_rows(ids: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[n, k] bool: ids[i, j] occurs in reference[i, :]."""
    return (ids[:, :, None] == reference[:, None, :]).any(dim=-1)
