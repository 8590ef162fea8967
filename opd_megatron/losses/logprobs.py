"""Log-probabilities of given token ids (and the entropy) from vocab-parallel logits.

Shared by the GRPO and SFT losses and by rollout scoring. Unlike megatron's
`vocab_parallel_cross_entropy`, the logits are never modified in place.

Memory: the forward keeps two scalars per position (log-normaliser, entropy); the backward
recomputes the softmax chunk by chunk into the gradient, so the extra memory is the gradient shard
plus a few chunk buffers, never an autograd graph of shard-sized intermediates.
"""
from __future__ import annotations

import torch

from opd_megatron.losses._comm import all_reduce_columns, resolve_tp_group
from opd_megatron.losses.vocab_parallel import (
    VocabShard,
    Workspace,
    check_temperature,
    chunk_ranges,
    compute_dtype,
    global_max,
    load_scaled,
    row_dot,
)


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, shard: VocabShard, temperature: float, chunk_size):
        ctx.set_materialize_grads(False)
        dtype = compute_dtype(logits.dtype)
        rows = logits.reshape(-1, shard.width)
        flat_ids = ids.reshape(-1, 1).long()
        lse = rows.new_empty(rows.shape[0], dtype=dtype)
        logp, entropy = torch.empty_like(lse), torch.empty_like(lse)
        ranges = chunk_ranges(rows.shape[0], shard.width, chunk_size, logits.device)
        ws = Workspace.for_chunks(ranges, shard, dtype, logits.device)
        for start, stop in ranges:
            n = stop - start
            z = load_scaled(rows[start:stop, :shard.valid], ws("z", n), temperature)
            zmax = global_max(z, shard)
            z.sub_(zmax)
            e = torch.exp(z, out=ws("e", n))
            sums = all_reduce_columns(
                {"e": e.sum(dim=-1), "e_z": row_dot(e, z, ws("scratch", n)),
                 "z_y": shard.gather(z, flat_ids[start:stop])[:, 0]}, shard.group)
            log_sum = sums["e"].log()
            lse[start:stop] = zmax[:, 0] + log_sum
            logp[start:stop] = sums["z_y"] - log_sum
            entropy[start:stop] = log_sum - sums["e_z"] / sums["e"]
        ctx.save_for_backward(logits, flat_ids, lse, entropy)
        ctx.shard, ctx.temperature, ctx.ranges = shard, temperature, ranges
        return logp.view(ids.shape), entropy.view(ids.shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, flat_ids, lse, entropy = ctx.saved_tensors
        shard, temperature = ctx.shard, ctx.temperature
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        # d/dz of the scaled logits; d/dlogits = that / temperature.
        scale = lse.new_tensor(1.0 / temperature)
        g_lp = None if grad_logp is None else grad_logp.reshape(-1, 1).to(lse.dtype) * scale
        g_h = None if grad_entropy is None else grad_entropy.reshape(-1, 1).to(lse.dtype) * scale
        rows = logits.reshape(-1, shard.width)
        grad = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
        grad_rows = grad.view(-1, shard.width)
        ws = Workspace.for_chunks(ctx.ranges, shard, lse.dtype, logits.device)
        for start, stop in ctx.ranges:
            n = stop - start
            g = load_scaled(rows[start:stop, :shard.valid], ws("g", n), temperature)
            g.sub_(lse[start:stop, None])  # log p
            p = torch.exp(g, out=ws("p", n))
            if g_h is not None:  # dH/dz_u = -p_u (log p_u + H)
                g.add_(entropy[start:stop, None]).mul_(p).mul_(-g_h[start:stop])
            else:
                g.zero_()
            if g_lp is not None:  # d log p_y / dz_u = 1[u = y] - p_u
                g.addcmul_(p, -g_lp[start:stop])
                shard.scatter_add_(g, flat_ids[start:stop], g_lp[start:stop])
            grad_rows[start:stop, :shard.valid].copy_(g)
        return grad, None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, ids: torch.Tensor, tp_group=None,
                            vocab_size: int | None = None, *, temperature: float = 1.0,
                            with_entropy: bool = False, chunk_size: int | None = None):
    """log p(ids) under softmax(logits / temperature) over the real vocabulary, [*ids.shape].

    `logits`: this rank's vocabulary shard, [..., V/tp]; `ids`: global token ids, logits.shape[:-1].
    With `with_entropy`, returns (logprobs, entropy); both are differentiable, fp32 (fp64 for fp64
    logits), and the gradient reaches `logits` only.
    """
    if ids.shape != logits.shape[:-1]:
        raise ValueError(f"ids shape {tuple(ids.shape)} must equal logits.shape[:-1] "
                         f"{tuple(logits.shape[:-1])}")
    shard = VocabShard.of(logits.shape[-1], vocab_size, resolve_tp_group(tp_group))
    shard.check_ids("ids", ids)
    logp, entropy = _LogProbs.apply(logits, ids, shard, check_temperature(temperature), chunk_size)
    return (logp, entropy) if with_entropy else logp
