"""Run a vocab-parallel loss on one rank's shard and its float64 reference on the full logits.

Each function returns relative errors max|got - ref| / max(1, max|ref|), so one tolerance fits
losses of any scale; used in-process (world 1) and by the torchrun workers (every rank compares its
own gradient slice).
"""
from __future__ import annotations

import torch

from opd_megatron.losses import (
    grpo_policy_loss,
    vocab_parallel_cross_entropy_loss,
    vocab_parallel_distill_loss,
    vocab_parallel_logprobs,
)
from tests.losses.reference import (
    reference_distill,
    reference_grpo,
    reference_logprobs,
)

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().double(), ref.detach().double()
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1.0)).item()


def shard(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    width = full.shape[-1] // world
    return full[..., rank * width:(rank + 1) * width].contiguous()


def upstream(shape, seed: int = 7) -> torch.Tensor:
    """A fixed random upstream gradient, so every position's gradient is checked separately."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def distill_errors(case: dict, dtype: torch.dtype, loss: str, support: str, *, rank: int = 0,
                   world: int = 1, tp_group=None, temperature: float = 0.7, beta: float = 0.3,
                   chunk_size: int | None = 3, with_metrics: bool = True) -> dict[str, float]:
    """with_metrics=False runs the metric-free passes and checks that no metric comes back."""
    kw = dict(loss=loss, top_k=case["top_k"], support=support, temperature=temperature,
              sampled_ids=case["sampled"], beta=beta, vocab_size=case["vocab_size"])
    student = shard(case["student"], rank, world).to(dtype).requires_grad_()
    got, metrics = vocab_parallel_distill_loss(
        student, shard(case["teacher"], rank, world).to(dtype), loss_mask=case["mask"],
        support_ids=case["given"], tp_group=tp_group, chunk_size=chunk_size,
        with_metrics=with_metrics, **kw)
    weights = upstream(got.shape)
    (got.double() * weights).sum().backward()

    full = case["student"].clone().requires_grad_()
    ref, ref_metrics = reference_distill(full, case["teacher"], mask=case["mask"],
                                         support_ids=case["given"], **kw)
    (ref * weights).sum().backward()
    errors = {"value": rel_err(got, ref),
              "grad": rel_err(student.grad, shard(full.grad, rank, world))}
    if not with_metrics:
        if metrics:
            raise AssertionError(f"with_metrics=False returned metrics {sorted(metrics)}")
        return errors
    if set(metrics) != set(ref_metrics):
        raise AssertionError(f"metric names {sorted(metrics)} != {sorted(ref_metrics)}")
    errors["metrics"] = max(rel_err(metrics[k], ref_metrics[k]) for k in ref_metrics)
    return errors


def logprobs_errors(case: dict, dtype: torch.dtype, *, rank: int = 0, world: int = 1,
                    tp_group=None, temperature: float = 0.7) -> dict[str, float]:
    logits = shard(case["student"], rank, world).to(dtype).requires_grad_()
    before = logits.detach().clone()
    logp, entropy = vocab_parallel_logprobs(logits, case["sampled"], tp_group, case["vocab_size"],
                                            temperature=temperature, with_entropy=True,
                                            chunk_size=3)
    w1, w2 = upstream(logp.shape, 1), upstream(logp.shape, 2)
    (logp.double() * w1 + entropy.double() * w2).sum().backward()
    full = case["student"].clone().requires_grad_()
    ref_logp, ref_entropy = reference_logprobs(full, case["sampled"], temperature,
                                               case["vocab_size"])
    (ref_logp * w1 + ref_entropy * w2).sum().backward()
    return {"logp": rel_err(logp, ref_logp), "entropy": rel_err(entropy, ref_entropy),
            "grad": rel_err(logits.grad, shard(full.grad, rank, world)),
            "input_modified": float(not torch.equal(before, logits.detach()))}


def grpo_inputs(case: dict, per_sequence: bool) -> dict:
    g = torch.Generator().manual_seed(11)
    shape = case["sampled"].shape
    ref_logp, _ = reference_logprobs(case["student"], case["sampled"],
                                     vocab_size=case["vocab_size"])
    # Old log-probs off by up to ±0.5 put many ratios outside [0.8, 1.28], on both sides.
    old = ref_logp + (torch.rand(shape, generator=g, dtype=torch.float64) - 0.5)
    advantages = torch.randn(shape[:1] if per_sequence else shape, generator=g,
                             dtype=torch.float64)
    ref_lp = ref_logp + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    return dict(old_logprobs=old, advantages=advantages, ref_logprobs=ref_lp)


def grpo_errors(case: dict, dtype: torch.dtype, per_sequence: bool, *, rank: int = 0,
                world: int = 1, tp_group=None, kl_coef: float = 0.1) -> dict[str, float]:
    inputs = grpo_inputs(case, per_sequence)
    logits = shard(case["student"], rank, world).to(dtype).requires_grad_()
    loss, _ = grpo_policy_loss(logits, case["sampled"], loss_mask=case["mask"], kl_coef=kl_coef,
                               tp_group=tp_group, vocab_size=case["vocab_size"], chunk_size=3,
                               **inputs)
    loss.backward()
    full = case["student"].clone().requires_grad_()
    ref = reference_grpo(full, case["sampled"], mask=case["mask"], kl_coef=kl_coef,
                         vocab_size=case["vocab_size"], **inputs)
    ref.backward()
    return {"value": rel_err(loss, ref),
            "grad": rel_err(logits.grad, shard(full.grad, rank, world))}


def sft_errors(case: dict, dtype: torch.dtype, *, rank: int = 0, world: int = 1,
               tp_group=None) -> dict[str, float]:
    labels = torch.where(case["mask"] != 0, case["sampled"], -100)
    logits = shard(case["student"], rank, world).to(dtype).requires_grad_()
    loss = vocab_parallel_cross_entropy_loss(logits, labels, case["mask"], tp_group=tp_group,
                                             vocab_size=case["vocab_size"], chunk_size=3)
    loss.backward()
    full = case["student"].clone().requires_grad_()
    vocab = case["vocab_size"]
    ref = torch.nn.functional.cross_entropy(full[..., :vocab].reshape(-1, vocab),
                                            labels.reshape(-1), ignore_index=-100)
    ref.backward()
    return {"value": rel_err(loss, ref),
            "grad": rel_err(logits.grad, shard(full.grad, rank, world))}
