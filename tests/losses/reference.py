"""Float64 full-vocabulary references for the losses, written literally from docs/LOSSES.md.

Plain autograd on the concatenated (unsharded) logits: no chunking, no analytic gradients, no
communication. Shared by the in-process tests and the torchrun workers.
"""
from __future__ import annotations

import torch


def make_case(seed: int, batch: int = 2, seq: int = 5, padded_vocab: int = 48,
              vocab_size: int = 43, top_k: int = 4, scale: float = 3.0):
    """Full-vocabulary float64 inputs: logits [batch, seq, padded_vocab] (the padding holds large
    values, which a correct implementation ignores), a mask with holes, sampled and support ids."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, seq, padded_vocab, generator=g, dtype=torch.float64) * scale
    # A teacher correlated with the student, so that the top-K sets overlap partly.
    noise = torch.randn(batch, seq, padded_vocab, generator=g, dtype=torch.float64)
    teacher = 0.6 * student + noise * scale * 0.8
    student[..., vocab_size:] = 50.0
    teacher[..., vocab_size:] = 50.0
    mask = (torch.rand(batch, seq, generator=g) > 0.25).to(torch.float64)
    mask[0, 0] = 1.0
    sampled = torch.randint(0, vocab_size, (batch, seq), generator=g)
    # Given support: the top-K of a perturbed student (as a rollout engine with other numerics
    # would report), so it overlaps both top-K sets without equalling either.
    jitter = torch.randn(batch, seq, vocab_size, generator=g, dtype=torch.float64) * scale
    given = (student[..., :vocab_size] + jitter).topk(top_k, -1).indices
    return dict(student=student, teacher=teacher, mask=mask, sampled=sampled, given=given,
                vocab_size=vocab_size, top_k=top_k)


def _isin(ids: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (ids[..., :, None] == reference[..., None, :]).any(-1)


def reference_distill(student, teacher, *, loss, top_k, support, temperature=1.0, mask=None,
                      sampled_ids=None, support_ids=None, beta=0.5, vocab_size=None):
    """(per_token_loss, metrics) in float64; `student` may require grad (full padded logits)."""
    vocab_size = student.shape[-1] if vocab_size is None else vocab_size
    z = student[..., :vocab_size].double() / temperature
    t = teacher[..., :vocab_size].double().detach() / temperature
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    p, q = logp.exp(), logq.exp()
    student_top = z.detach().topk(top_k, -1).indices
    teacher_top = t.topk(top_k, -1).indices
    S = {"student": student_top, "teacher": teacher_top, "given": support_ids}[support]
    lp_S, lq_S = logp.gather(-1, S), logq.gather(-1, S)
    p_S, q_S = lp_S.exp(), lq_S.exp()
    if loss == "full_rkl":
        value = (p * (logp - logq)).sum(-1)
    elif loss == "forward_kl":
        value = (q * (logq - logp)).sum(-1)
    elif loss == "jsd":
        m = beta * q + (1 - beta) * p
        value = beta * (q * (logq - m.log())).sum(-1) + (1 - beta) * (p * (logp - m.log())).sum(-1)
    elif loss == "sampled_pg":
        lp_y = logp.gather(-1, sampled_ids[..., None])[..., 0]
        lq_y = logq.gather(-1, sampled_ids[..., None])[..., 0]
        value = -(-(lp_y - lq_y)).detach() * lp_y
    elif loss == "topk_rkl":
        value = (p_S * (lp_S - lq_S)).sum(-1)
    elif loss == "topk_rkl_sg":
        value = (p_S * (lp_S - lq_S).detach()).sum(-1)
    elif loss == "topk_rkl_tail":
        p_tail, q_tail = 1 - p_S.sum(-1), 1 - q_S.sum(-1)
        value = (p_S * (lp_S - lq_S)).sum(-1) + p_tail * (p_tail / q_tail).log()
    elif loss in ("topk_rkl_norm", "topk_fkl_norm", "topk_mixed_norm"):
        inside = _isin(S, teacher_top)
        empty = ~inside.any(-1, keepdim=True)
        inside_safe = inside | empty  # keeps empty rows finite; they are zeroed below
        lpn = torch.log_softmax(torch.where(inside_safe, lp_S, -torch.inf), -1)
        lqn = torch.log_softmax(torch.where(inside_safe, lq_S, -torch.inf), -1)
        lpn, lqn = torch.where(inside_safe, lpn, 0.0), torch.where(inside_safe, lqn, 0.0)
        pn = torch.where(inside_safe, lpn.exp(), 0.0)
        qn = torch.where(inside_safe, lqn.exp(), 0.0)
        rkl, fkl = (pn * (lpn - lqn)).sum(-1), (qn * (lqn - lpn)).sum(-1)
        # NeMo-RL's kl_type reverse / forward / mixed (mixed_kl_weight = beta) on the same set.
        value = {"topk_rkl_norm": rkl, "topk_fkl_norm": fkl,
                 "topk_mixed_norm": beta * fkl + (1 - beta) * rkl}[loss] * (~empty[..., 0])
    else:
        raise ValueError(loss)
    mask = torch.ones(value.shape, dtype=torch.float64) if mask is None else mask.double()
    per_token = value * mask
    valid = mask != 0
    mean = lambda x: x.detach()[valid].sum() / valid.sum().clamp_min(1)  # noqa: E731
    metrics = {
        "topk_overlap": mean(_isin(student_top, teacher_top).double().sum(-1) / top_k),
        "student_entropy": mean(-(p * logp).sum(-1)),
        "kl_estimate": mean((p * (logp - logq)).sum(-1)),
        "student_support_mass": mean(p_S.sum(-1)),
        "teacher_support_mass": mean(q_S.sum(-1)),
    }
    if sampled_ids is not None:
        t_y = t.gather(-1, sampled_ids[..., None])
        metrics["teacher_rank_of_sampled"] = mean(1 + (t > t_y).double().sum(-1))
    return per_token, metrics


def reference_logprobs(logits, ids, temperature=1.0, vocab_size=None):
    """(log p(ids), entropy) in float64 from full logits."""
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    logp = torch.log_softmax(logits[..., :vocab_size].double() / temperature, -1)
    return logp.gather(-1, ids[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


def reference_grpo(logits, ids, old_logprobs, advantages, mask, clip_low=0.2, clip_high=0.28,
                   ref_logprobs=None, kl_coef=0.0, vocab_size=None):
    """Token-mean GRPO loss, written the usual way (verl's max of the two negated surrogates)."""
    logp, _ = reference_logprobs(logits, ids, vocab_size=vocab_size)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    ratio = (logp - old_logprobs).exp()
    losses = torch.maximum(-advantages * ratio,
                           -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))
    if ref_logprobs is not None:
        kl = (ref_logprobs - logp).exp() - (ref_logprobs - logp) - 1
        losses = losses + kl_coef * kl
    return (losses * mask).sum() / mask.sum()
