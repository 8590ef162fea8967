"""Vocab-parallel distillation loss: per objective, only the passes over the shards it needs.

Objectives renormalised on their support (`topk_*_norm`) read K columns per side: the teacher's
top-K (one selection pass over the teacher shard, in its own dtype), the student's top-K only for
`support=student`, and the logits at the support ids (each rank reads the ids in its shard, one
all-reduce). Their gradient lives on the support: backward scatters K entries per position into a
zero gradient whose other pages are never written (_zeroed.py) and reads no logits at all.

Every other objective makes one chunked pass; per chunk of positions, with z = student / T and
t = teacher / T on this rank's real columns, upcast once into reused buffers:
  1. global top-K of z (of t) where the support or the metrics need it, else the row max; the
     top-K's first column is the global max;
  2. exp(z - max), exp(t - max) and their full-vocabulary sums, the dot products the objective or
     the metrics need, z and t at the support ids; one all-reduce of these per-position columns;
  3. only for jsd or the teacher-rank metric: sums that need the normalised p and q, or the
     sampled logit, one more all-reduce over the chunk while it is still in cache.
Everything after that is per position (distill_objectives.py).

Metrics (`with_metrics`) need the full vocabulary; the stages ask for them every
`distill.metrics_every` steps. A renormalised objective then also makes the full pass.

Backward of the full-vocabulary objectives recomputes log p (and log q where the dense gradient
needs it) chunk by chunk from the saved per-position normalisers and writes each chunk of the
gradient once; it needs no communication. Extra memory: the gradient shard plus a few chunk
buffers (see vocab_parallel.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import torch.distributed as dist

from opd_megatron.losses._comm import all_reduce_, all_reduce_columns, resolve_tp_group
from opd_megatron.losses._zeroed import zeros_untouched
from opd_megatron.losses.distill_objectives import OBJECTIVES, Objective, PositionStats
from opd_megatron.losses.vocab_parallel import (
    VocabShard,
    Workspace,
    check_temperature,
    chunk_ranges,
    compute_dtype,
    global_topk,
    load_scaled,
    load_shifted,
    local_max,
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
    with_metrics: bool

    def needs(self, what: str) -> bool:
        return what in self.objective.needs

    @property
    def support_only(self) -> bool:
        """Whether the forward reads only the support (no metric needs the full vocabulary)."""
        return self.objective.support_only and not self.with_metrics

    @property
    def metric_names(self) -> tuple[str, ...]:
        if not self.with_metrics:
            return ()
        return METRICS if self.sampled_ids is not None else METRICS[:-1]


def vocab_parallel_distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                                loss: str, top_k: int = 20, support: str = "student",
                                temperature: float = 1.0, loss_mask: torch.Tensor | None = None,
                                sampled_ids: torch.Tensor | None = None,
                                support_ids: torch.Tensor | None = None, beta: float = 0.5,
                                tp_group=None, vocab_size: int | None = None,
                                chunk_size: int | None = None, with_metrics: bool = True):
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
    chunk_size: positions per chunk; None picks it from the device's buffer budget.
    with_metrics: False skips the diagnostics (METRICS), which need the full vocabulary; the
        metrics dict is then empty.

    Returns (per_token_loss [batch, seq], metrics): the loss is in fp32 (fp64 for fp64 logits);
    metrics are detached scalars, means over positions with a non-zero mask.
    """
    plan = _make_plan(student_logits, teacher_logits, loss, top_k, support, temperature,
                      loss_mask, sampled_ids, support_ids, beta, tp_group, vocab_size, chunk_size,
                      with_metrics)
    per_token, metric_values = _Distill.apply(student_logits, teacher_logits.detach(), plan)
    return per_token, dict(zip(plan.metric_names, metric_values.unbind()))


def _make_plan(student, teacher, loss, top_k, support, temperature, loss_mask, sampled_ids,
               support_ids, beta, tp_group, vocab_size, chunk_size, with_metrics) -> _Plan:
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
                 shard, chunk_size, mask.reshape(-1), sampled_ids, support_ids, bool(with_metrics))


class _Distill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, plan: _Plan):
        shard, objective = plan.shard, plan.objective
        dtype = compute_dtype(student.dtype)
        s_rows = student.reshape(-1, shard.width)
        t_rows = teacher.reshape(-1, shard.width)
        num = s_rows.shape[0]
        ranges = chunk_ranges(num, shard.width, plan.chunk_size, student.device)
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
        metrics = new(len(plan.metric_names))
        chunk_pass = _support_chunk if plan.support_only else _forward_chunk
        for start, stop in ranges:
            terms, support, chunk_lse, chunk_metrics = chunk_pass(
                plan, ws, s_rows[start:stop, :shard.valid], t_rows[start:stop, :shard.valid],
                slice(start, stop))
            keep = plan.mask[start:stop] != 0
            # Masked positions contribute exact zeros, whatever their logits held.
            value[start:stop] = torch.where(keep, terms.value * plan.mask[start:stop], 0.0)
            if chunk_lse is not None:
                lse_student[start:stop], lse_teacher[start:stop] = chunk_lse
            if terms.shift is not None:
                shift[start:stop] = torch.where(keep, terms.shift, 0.0)
            if objective.sparse_on is not None:
                sparse[start:stop] = torch.where(keep[:, None], terms.sparse, 0.0)
            if objective.sparse_on == "support":
                sparse_ids[start:stop] = support
            metrics[start:stop] = chunk_metrics
        # A gradient that lives on the support needs no logits in backward.
        logits = () if objective.dense is None else (student, teacher)
        ctx.save_for_backward(lse_student, lse_teacher, shift,
                              *(() if sparse_ids is None else (sparse, sparse_ids)), *logits)
        ctx.plan, ctx.ranges = plan, ranges
        ctx.grad_like = (student.shape, student.dtype, student.device)
        valid = plan.mask != 0
        metric_means = torch.where(valid[:, None], metrics, 0.0).sum(0) / valid.sum().clamp_min(1)
        ctx.mark_non_differentiable(metric_means)
        return value.view(student.shape[:-1]), metric_means

    @staticmethod
    def backward(ctx, grad_value, _grad_metrics):
        plan, shard = ctx.plan, ctx.plan.shard
        lse_student, lse_teacher, shift, *rest = ctx.saved_tensors
        sparse_terms = rest[:2] if plan.objective.sparse_on is not None else ()
        shape, dtype, device = ctx.grad_like
        # Per-position weight of dL/dz; the 1/T turns it into dL/dlogits.
        weight = grad_value.reshape(-1).to(shift.dtype) * plan.mask / plan.temperature
        if plan.objective.dense is None:
            grad = zeros_untouched(shape, dtype, device)
            sparse, sparse_ids = sparse_terms
            shard.scatter_add_(grad.view(-1, shard.width), sparse_ids, sparse * weight[:, None])
            return grad, None, None
        student, teacher = rest[-2:]
        s_rows = student.reshape(-1, shard.width)
        t_rows = teacher.reshape(-1, shard.width)
        grad = torch.empty(shape, dtype=dtype, device=device)
        grad_rows = grad.view(-1, shard.width)
        grad_rows[:, shard.valid:] = 0  # padding columns
        ws = Workspace.for_chunks(ctx.ranges, shard, shift.dtype, device)
        for start, stop in ctx.ranges:
            rows = slice(start, stop)
            target = grad_rows[rows, :shard.valid]
            # In the compute dtype the chunk is computed in place in the gradient: one write.
            out = target if dtype == shift.dtype else ws("grad", stop - start)
            _dense_grad(plan, ws, s_rows[rows, :shard.valid], t_rows[rows, :shard.valid],
                        lse_student[rows, None], lse_teacher[rows, None], shift[rows, None],
                        weight[rows, None], out)
            if sparse_terms:
                sparse, sparse_ids = sparse_terms
                shard.scatter_add_(out, sparse_ids[rows], sparse[rows] * weight[rows, None])
            if out is not target:
                target.copy_(out)
        return grad, None, None


def _support_chunk(plan: _Plan, ws: Workspace, s_rows, t_rows, rows: slice):
    """A renormalised objective from the K logits per side on the support; no normalisers, no
    metrics. (terms, support ids, None, empty metrics)."""
    shard, k, temperature = plan.shard, plan.top_k, plan.temperature
    dtype = compute_dtype(s_rows.dtype)
    # The K values per side are scaled and upcast as load_scaled would have computed them.
    t_sel, t_in_place = _selectable(t_rows, ws, "t", temperature)
    t_top, t_top_ids = global_topk(t_sel, k, shard)
    columns = {}
    if plan.support == "teacher":
        support, t_support = t_top_ids, _scaled(t_top.to(dtype), t_in_place, temperature)
    else:
        if plan.support == "student":
            _, support = global_topk(_selectable(s_rows, ws, "z", temperature)[0], k, shard)
        else:
            support = plan.support_ids[rows]
        columns["t_support"] = shard.gather(t_rows, support).to(dtype)
    columns["z_support"] = shard.gather(s_rows, support).to(dtype)
    columns = all_reduce_columns(columns, shard.group)
    if plan.support != "teacher":
        t_support = columns["t_support"] / temperature
    stats = PositionStats(
        logp_support=columns["z_support"] / temperature, logq_support=t_support,
        support_in_teacher_topk=_isin_rows(support, t_top_ids), beta=plan.beta)
    return plan.objective.terms(stats), support, None, t_support.new_zeros((len(support), 0))


def _selectable(rows: torch.Tensor, ws: Workspace, name: str, temperature: float):
    """(x, in_place): rows to select from. Selection is order-only, so fp32/fp64 rows are read in
    place, unscaled (in_place=True); bf16/fp16 are upcast and scaled into the chunk buffer first (a
    copy and an fp32 max beat a half-precision max on CPU)."""
    if rows.dtype == compute_dtype(rows.dtype):
        return rows, True
    return load_scaled(rows, ws(name, rows.shape[0]), temperature), False


def _scaled(values: torch.Tensor, in_place: bool, temperature: float) -> torch.Tensor:
    """Values read from _selectable's x, in the temperature-scaled compute dtype."""
    return values / temperature if in_place else values


def _forward_chunk(plan: _Plan, ws: Workspace, s_rows, t_rows, rows: slice):
    """(objective terms, support ids, (lse of z, lse of t), metrics [n, len(metric_names)])."""
    shard, k, n, temperature = plan.shard, plan.top_k, s_rows.shape[0], plan.temperature
    with_metrics = plan.with_metrics
    z_sel, z_in_place = _selectable(s_rows, ws, "z", temperature)
    t_sel, t_in_place = _selectable(t_rows, ws, "t", temperature)
    # Phase 1: global top-K where the support, I = S ∩ TopK(q) or the overlap metric needs it;
    # its column 0 is the max that stabilises exp. Otherwise the max alone.
    z_top_ids = t_top_ids = z_max = t_max = None
    if plan.support == "student" or with_metrics:
        z_top, z_top_ids = global_topk(z_sel, k, shard)
        z_max = z_top[:, :1]
    if plan.support == "teacher" or with_metrics or plan.objective.support_only:
        t_top, t_top_ids = global_topk(t_sel, k, shard)
        t_max = t_top[:, :1]
    if z_max is None or t_max is None:
        z_max, t_max = _global_max(z_sel, t_sel, shard, z_max, t_max)
    z_max = _scaled(z_max, z_in_place, temperature)
    t_max = _scaled(t_max, t_in_place, temperature)
    # z - max z in the buffer: one pass from the rows, or in place after the upcast.
    z = load_shifted(s_rows, ws("z", n), temperature, z_max) if z_in_place else z_sel.sub_(z_max)
    t = load_shifted(t_rows, ws("t", n), temperature, t_max) if t_in_place else t_sel.sub_(t_max)
    support = {"student": z_top_ids, "teacher": t_top_ids,
               "given": None if plan.support_ids is None else plan.support_ids[rows]}[plan.support]
    sampled = None if plan.sampled_ids is None else plan.sampled_ids[rows, None]

    # Phase 2: normalisers, full-vocabulary sums and the values on the support, one all-reduce.
    ez = torch.exp(z, out=ws("ez", n))
    et = torch.exp(t, out=ws("et", n))
    scratch = ws("scratch", n)
    sums = {"ez": ez.sum(dim=-1), "et": et.sum(dim=-1), "z_support": shard.gather(z, support),
            "t_support": shard.gather(t, support)}
    if plan.needs("rkl") or with_metrics:
        sums.update(ez_z=row_dot(ez, z, scratch), ez_t=row_dot(ez, t, scratch))
    if plan.needs("fkl"):
        sums.update(et_t=row_dot(et, t, scratch), et_z=row_dot(et, z, scratch))
    if sampled is not None:
        sums.update(z_sampled=shard.gather(z, sampled)[:, 0],
                    t_sampled=shard.gather(t, sampled)[:, 0])
    sums = all_reduce_columns(sums, shard.group)
    log_zs, log_ts = sums["ez"].log(), sums["et"].log()
    stats = PositionStats(
        logp_support=sums["z_support"] - log_zs[:, None],
        logq_support=sums["t_support"] - log_ts[:, None], beta=plan.beta,
        support_in_teacher_topk=None if t_top_ids is None else _isin_rows(support, t_top_ids))
    if "ez_z" in sums:
        mean_z, mean_t = sums["ez_z"] / sums["ez"], sums["ez_t"] / sums["ez"]  # E_p[z - max z]
        stats.rkl = mean_z - log_zs - mean_t + log_ts
    if plan.needs("fkl"):
        stats.fkl = (sums["et_t"] - sums["et_z"]) / sums["et"] - log_ts + log_zs
    if sampled is not None:
        stats.logp_sampled = sums["z_sampled"] - log_zs
        stats.logq_sampled = sums["t_sampled"] - log_ts

    # Phase 3: what needs the normalised distributions or the sampled logit, one more all-reduce.
    late = {}
    if sampled is not None and with_metrics:
        late["above_sampled"] = torch.gt(t, sums["t_sampled"][:, None], out=scratch).sum(dim=-1)
    if plan.needs("jsd"):
        p, q = ez.div_(sums["ez"][:, None]), et.div_(sums["et"][:, None])
        logp, logq = z.sub_(log_zs[:, None]), t.sub_(log_ts[:, None])
        late["kl_pm"], late["kl_qm"] = _jsd_sums(plan.beta, ws, p, q, logp, logq)
    late = all_reduce_columns(late, shard.group)
    if plan.needs("jsd"):
        stats.kl_pm, stats.kl_qm = late["kl_pm"], late["kl_qm"]

    metrics = z.new_zeros((n, 0))
    if with_metrics:
        metrics = torch.stack([
            _isin_rows(z_top_ids, t_top_ids).sum(dim=-1).to(z.dtype) / k,
            log_zs - mean_z,  # entropy
            stats.rkl,
            stats.logp_support.exp().sum(dim=-1),
            stats.logq_support.exp().sum(dim=-1),
            *((late["above_sampled"] + 1,) if sampled is not None else ()),
        ], dim=-1)
    lse = (z_max[:, 0] + log_zs, t_max[:, 0] + log_ts)
    return plan.objective.terms(stats), support, lse, metrics


def _global_max(z, t, shard, z_max, t_max) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 1] global maxima of z and t, those not already known from a top-K; one all-reduce."""
    local = torch.cat([local_max(z, shard) if z_max is None else z_max,
                       local_max(t, shard) if t_max is None else t_max], dim=1)
    all_reduce_(local, shard.group, op=dist.ReduceOp.MAX)
    return local[:, :1], local[:, 1:]


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


def _dense_grad(plan: _Plan, ws: Workspace, s_rows, t_rows, lse_s, lse_t, shift, weight, out):
    """The dense part of dL/dlogits for one chunk (see distill_objectives.py), into `out`."""
    dense = plan.objective.dense
    logp = load_shifted(s_rows, out, plan.temperature, lse_s)
    if dense == "p":
        return logp.exp_().mul_(-shift * weight)
    n = s_rows.shape[0]
    p = torch.exp(logp, out=ws("p", n))
    logq = load_shifted(t_rows, ws("logq", n), plan.temperature, lse_t)
    if dense == "rkl":
        return logp.sub_(logq).sub_(shift).mul_(p).mul_(weight)
    if dense == "fkl":
        return torch.sub(p, logq.exp_(), out=out).mul_(weight)
    # jsd: log m = log(beta q + (1 - beta) p), clamped as in _jsd_sums.
    logm = logq.exp_().mul_(plan.beta).add_(p, alpha=1 - plan.beta)
    logm.clamp_min_(torch.finfo(logm.dtype).tiny).log_()
    return logp.sub_(logm).sub_(shift).mul_(p).mul_((1 - plan.beta) * weight)


def _isin_rows(ids: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[n, k] bool: ids[i, j] occurs in reference[i, :]."""
    return (ids[:, :, None] == reference[:, None, :]).any(dim=-1)
