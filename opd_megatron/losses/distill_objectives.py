"""The distillation objectives of docs/LOSSES.md, per position, from per-position quantities.

The chunked pass (distill.py) reduces the vocabulary to a few numbers per position: full-vocabulary
sums and the exact log-probabilities on the support K ids. An objective turns them into its value
and into the coefficients of its gradient w.r.t. the temperature-scaled student logits z:

    dL/dz_u = dense_u + sum_j sparse_j 1[u = ids_j]

`dense` is one of four closed forms that backward evaluates from recomputed log p, log q:
    "p":    -shift p_u                                (the softmax normaliser's share)
    "rkl":  p_u (log p_u - log q_u - shift)
    "fkl":  p_u - q_u
    "jsd":  (1 - beta) p_u (log p_u - log m_u - shift)
and `sparse` lives on the support ids, or on the sampled id. An objective with no dense part is
renormalised on its support: it needs only the K logits per side there, never the vocabulary. All come from one identity: for a
loss f(p), dL/dz_u = h_u - p_u sum_v h_v with h_v = p_v df/dp_v.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class PositionStats:
    """Per-position quantities of one chunk ([n] or [n, K]); optional ones only when needed."""

    logp_support: torch.Tensor  # log p on the support ids (normalised over the full vocabulary)
    logq_support: torch.Tensor
    beta: float
    support_in_teacher_topk: torch.Tensor | None = None  # bool: I = S ∩ TopK(q), renormalised
    rkl: torch.Tensor | None = None  # KL(p || q), full vocabulary
    logp_sampled: torch.Tensor | None = None
    logq_sampled: torch.Tensor | None = None
    fkl: torch.Tensor | None = None  # KL(q || p)
    kl_pm: torch.Tensor | None = None  # KL(p || m), m = beta q + (1 - beta) p
    kl_qm: torch.Tensor | None = None  # KL(q || m)


@dataclass
class Terms:
    value: torch.Tensor
    shift: torch.Tensor | None = None
    sparse: torch.Tensor | None = None


@dataclass(frozen=True)
class Objective:
    terms: Callable[[PositionStats], Terms]
    dense: str | None  # one of the closed forms above, None: the gradient is all sparse
    sparse_on: str | None  # "support", "sampled" or None
    needs: frozenset = frozenset()  # optional PositionStats fields: "rkl", "fkl", "jsd", "sampled"

    @property
    def support_only(self) -> bool:
        """Renormalised on the support: the K logits per side there are all it reads."""
        return self.dense is None and self.sparse_on == "support"


def _full_rkl(st: PositionStats) -> Terms:
    return Terms(st.rkl, shift=st.rkl)


def _forward_kl(st: PositionStats) -> Terms:
    return Terms(st.fkl)


def _jsd(st: PositionStats) -> Terms:
    # df/dp_v = (1 - beta) log(p_v / m_v): the +1 of p log p cancels against d(log m)/dp.
    return Terms(st.beta * st.kl_qm + (1 - st.beta) * st.kl_pm, shift=st.kl_pm)


def _sampled_pg(st: PositionStats) -> Terms:
    # Advantage -(log p - log q)(y) is detached; the gradient A (1[u = y] - p_u) has expectation
    # sum_y p(y) A(y) grad log p(y) = grad KL(p || q) under y ~ p.
    advantage = st.logp_sampled - st.logq_sampled
    return Terms(advantage * st.logp_sampled, shift=advantage, sparse=advantage[:, None])


def _support_rkl(st: PositionStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(p on S, log-ratio A on S, sum_S p A)."""
    p = st.logp_support.exp()
    log_ratio = st.logp_support - st.logq_support
    return p, log_ratio, (p * log_ratio).sum(dim=-1)


def _topk_rkl_sg(st: PositionStats) -> Terms:
    p, log_ratio, value = _support_rkl(st)
    return Terms(value, shift=value, sparse=p * log_ratio)


def _topk_rkl(st: PositionStats) -> Terms:
    # Without the stop-gradient, d(log p)/dz adds grad(P_S): the +1 on S and the P_S in the shift.
    p, log_ratio, value = _support_rkl(st)
    return Terms(value, shift=value + p.sum(dim=-1), sparse=p * (log_ratio + 1))


def _topk_rkl_tail(st: PositionStats) -> Terms:
    # The tail bucket is one more outcome with log-ratio B: c_u = A_u on S, B off S, and
    # dL/dz_u = p_u (c_u - L) = p_u (B - L) + 1[u in S] p_u (A_u - B).
    p, log_ratio, support_value = _support_rkl(st)
    tiny = torch.finfo(p.dtype).tiny
    p_tail = (1 - p.sum(dim=-1)).clamp_min(0)
    q_tail = (1 - st.logq_support.exp().sum(dim=-1)).clamp_min(0)
    tail_ratio = p_tail.clamp_min(tiny).log() - q_tail.clamp_min(tiny).log()
    value = support_value + p_tail * tail_ratio
    return Terms(value, shift=value - tail_ratio, sparse=p * (log_ratio - tail_ratio[:, None]))


def _renormalised(st: PositionStats):
    """(p~, q~, log p~ - log q~) on I = S ∩ TopK(q), zero off I; both renormalised on I.

    They depend on z only through z_I (a softmax restricted to I), so the gradients below live on
    I, and a per-position constant added to logp_support or logq_support changes nothing: the
    support-only pass passes unnormalised logits. An empty I contributes nothing.
    """
    inside = st.support_in_teacher_topk
    logp = _log_renormalise(st.logp_support, inside)
    logq = _log_renormalise(st.logq_support, inside)
    p = torch.where(inside, logp.exp(), 0.0)
    q = torch.where(inside, logq.exp(), 0.0)
    return p, q, torch.where(inside, logp - logq, 0.0)


def _rkl_on_support(p, log_ratio) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p~ || q~) and its gradient p~_u (a_u - L)."""
    value = (p * log_ratio).sum(dim=-1)
    return value, p * (log_ratio - value[:, None])


def _topk_rkl_norm(st: PositionStats) -> Terms:
    p, _, log_ratio = _renormalised(st)
    value, grad = _rkl_on_support(p, log_ratio)
    return Terms(value, sparse=grad)


def _topk_fkl_norm(st: PositionStats) -> Terms:
    # KL(q~ || p~) = sum_I q~ (log q~ - log p~); d/dz_u = p~_u - q~_u on I.
    p, q, log_ratio = _renormalised(st)
    return Terms(-(q * log_ratio).sum(dim=-1), sparse=p - q)


def _topk_mixed_norm(st: PositionStats) -> Terms:
    # NeMo-RL's "mixed" KL: beta KL(q~ || p~) + (1 - beta) KL(p~ || q~), on the same I.
    p, q, log_ratio = _renormalised(st)
    rkl, rkl_grad = _rkl_on_support(p, log_ratio)
    value = -st.beta * (q * log_ratio).sum(dim=-1) + (1 - st.beta) * rkl
    return Terms(value, sparse=st.beta * (p - q) + (1 - st.beta) * rkl_grad)


def _log_renormalise(logx: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    masked = torch.where(inside, logx, -torch.inf)
    # An empty row has lse -inf; substituting 0 keeps it finite (its entries are masked anyway).
    lse = masked.logsumexp(dim=-1, keepdim=True)
    return masked - torch.where(torch.isfinite(lse), lse, 0.0)


OBJECTIVES: dict[str, Objective] = {
    "full_rkl": Objective(_full_rkl, dense="rkl", sparse_on=None, needs=frozenset({"rkl"})),
    "forward_kl": Objective(_forward_kl, dense="fkl", sparse_on=None, needs=frozenset({"fkl"})),
    "jsd": Objective(_jsd, dense="jsd", sparse_on=None, needs=frozenset({"jsd"})),
    "sampled_pg": Objective(_sampled_pg, dense="p", sparse_on="sampled",
                            needs=frozenset({"sampled"})),
    "topk_rkl": Objective(_topk_rkl, dense="p", sparse_on="support"),
    "topk_rkl_sg": Objective(_topk_rkl_sg, dense="p", sparse_on="support"),
    "topk_rkl_norm": Objective(_topk_rkl_norm, dense=None, sparse_on="support"),
    "topk_fkl_norm": Objective(_topk_fkl_norm, dense=None, sparse_on="support"),
    "topk_mixed_norm": Objective(_topk_mixed_norm, dense=None, sparse_on="support"),
    "topk_rkl_tail": Objective(_topk_rkl_tail, dense="p", sparse_on="support"),
}
