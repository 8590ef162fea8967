"""Distillation loss at TP=1 against the float64 reference, and the identities of docs/LOSSES.md."""
from __future__ import annotations

import pytest
import torch

from opd_megatron.losses import LOSSES, SUPPORTS, vocab_parallel_distill_loss
from opd_megatron.losses.distill_objectives import OBJECTIVES
from tests.losses.compare import TOLERANCE, distill_errors, upstream
from tests.losses.reference import make_case

CASE = make_case(0, top_k=6)


@pytest.mark.parametrize("with_metrics", [True, False], ids=["metrics", "no_metrics"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("support", SUPPORTS)
@pytest.mark.parametrize("loss", LOSSES)
def test_matches_reference(loss, support, dtype, with_metrics):
    errors = distill_errors(CASE, dtype, loss, support, with_metrics=with_metrics)
    assert max(errors.values()) < TOLERANCE[dtype], errors


def test_chunking_does_not_change_results():
    runs = [distill_errors(CASE, torch.float64, "jsd", "given", chunk_size=c) for c in (1, 4, None)]
    for errors in runs:
        assert max(errors.values()) < 1e-12, runs


def _grad(loss: str, case=CASE, support="student", top_k=None, **kw) -> torch.Tensor:
    student = case["student"].clone().requires_grad_()
    out, _ = vocab_parallel_distill_loss(
        student, case["teacher"], loss=loss, top_k=top_k or case["top_k"], support=support,
        loss_mask=case["mask"], support_ids=case["given"], sampled_ids=case["sampled"],
        vocab_size=case["vocab_size"], **kw)
    (out * upstream(out.shape)).sum().backward()
    return out.detach(), student.grad


@pytest.mark.parametrize("support", ["student", "given"])
def test_biased_minus_stop_gradient_is_grad_of_support_mass(support):
    _, biased = _grad("topk_rkl", support=support)
    _, stopped = _grad("topk_rkl_sg", support=support)
    student = CASE["student"].clone().requires_grad_()
    vocab = CASE["vocab_size"]
    p = torch.softmax(student[..., :vocab], -1)
    ids = {"student": student.detach()[..., :vocab].topk(CASE["top_k"], -1).indices,
           "given": CASE["given"]}[support]
    support_mass = p.gather(-1, ids).sum(-1) * CASE["mask"]
    (support_mass * upstream(support_mass.shape)).sum().backward()
    torch.testing.assert_close(biased - stopped, student.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("loss", ["topk_rkl", "topk_rkl_sg"])
def test_topk_with_whole_vocabulary_is_full_rkl(loss):
    value, grad = _grad(loss, top_k=CASE["vocab_size"])
    full_value, full_grad = _grad("full_rkl")
    torch.testing.assert_close(value, full_value, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, full_grad, rtol=0, atol=1e-12)


def _single_position(positions: int, vocab: int = 11, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    t = torch.randn(vocab, generator=g, dtype=torch.float64) * 2
    return z, t, z.expand(1, positions, vocab), t.expand(1, positions, vocab)


def _sampled_pg_grads(z, t, student, teacher, sampled, weights):
    student = student.clone().requires_grad_()
    out, _ = vocab_parallel_distill_loss(student, teacher, loss="sampled_pg", top_k=3,
                                         sampled_ids=sampled)
    (out * weights).sum().backward()
    return student.grad.sum(dim=(0, 1))


def _full_rkl_grad(z, t):
    z = z.clone().requires_grad_()
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(t, -1)
    (logp.exp() * (logp - logq)).sum().backward()
    return z.grad


def test_sampled_pg_is_unbiased_for_full_rkl_exactly():
    """sum_y p(y) grad L(y) over every token y equals grad KL(p || q)."""
    vocab = 11
    z, t, student, teacher = _single_position(vocab, vocab)
    p = torch.softmax(z, -1)
    expected = _sampled_pg_grads(z, t, student, teacher, torch.arange(vocab)[None], p[None])
    torch.testing.assert_close(expected, _full_rkl_grad(z, t), rtol=0, atol=1e-12)


def test_sampled_pg_average_over_samples_approaches_full_rkl():
    samples = 20000
    z, t, student, teacher = _single_position(samples)
    g = torch.Generator().manual_seed(5)
    sampled = torch.multinomial(torch.softmax(z, -1), samples, replacement=True, generator=g)
    weights = torch.full((1, samples), 1.0 / samples, dtype=torch.float64)
    average = _sampled_pg_grads(z, t, student, teacher, sampled[None], weights)
    full = _full_rkl_grad(z, t)
    assert (average - full).norm() < 0.05 * full.norm()


def test_topk_rkl_norm_is_zero_where_topk_sets_are_disjoint():
    case = dict(CASE)
    disjoint = torch.zeros(case["mask"].shape, dtype=torch.bool)
    disjoint[0, 1:3] = disjoint[1, 0] = True
    # Where the teacher is the negated student its top-K is the student's bottom-K.
    case["teacher"] = torch.where(disjoint[..., None], -case["student"], case["teacher"])
    case["teacher"][..., case["vocab_size"]:] = 50.0
    value, grad = _grad("topk_rkl_norm", case=case)
    assert (value[disjoint] == 0).all() and (grad[disjoint] == 0).all()
    assert (value[~disjoint & (case["mask"] != 0)] != 0).any()


@pytest.mark.parametrize("loss", LOSSES)
def test_all_masked_gives_zero_loss_and_no_nan(loss):
    student = CASE["student"].clone().requires_grad_()
    out, metrics = vocab_parallel_distill_loss(
        student, CASE["teacher"], loss=loss, top_k=CASE["top_k"], sampled_ids=CASE["sampled"],
        loss_mask=torch.zeros_like(CASE["mask"]), vocab_size=CASE["vocab_size"])
    out.sum().backward()
    assert (out == 0).all() and (student.grad == 0).all()
    assert all(v.item() == 0 for v in metrics.values()), metrics


@pytest.mark.parametrize("loss", LOSSES)
def test_teacher_gets_no_gradient(loss):
    student = CASE["student"].clone().requires_grad_()
    teacher = CASE["teacher"].clone().requires_grad_()
    out, metrics = vocab_parallel_distill_loss(student, teacher, loss=loss, top_k=4,
                                               sampled_ids=CASE["sampled"])
    out.sum().backward()
    assert teacher.grad is None and student.grad is not None
    assert not any(v.requires_grad for v in metrics.values())


def test_backward_saves_no_vocabulary_sized_intermediates():
    """The graph holds the two input shards and O(positions * K) tensors, nothing shard-sized."""
    student = CASE["student"].clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        vocab_parallel_distill_loss(student, CASE["teacher"], loss="jsd", top_k=4)
    large = [x for x in saved if x.numel() >= CASE["student"].numel()]
    assert len(large) == 2 and any(x is student for x in large), [x.shape for x in saved]


def test_bf16_inputs_compute_in_fp32():
    student = CASE["student"].to(torch.bfloat16).requires_grad_()
    out, _ = vocab_parallel_distill_loss(student, CASE["teacher"].to(torch.bfloat16),
                                         loss="topk_rkl_sg", top_k=4, loss_mask=CASE["mask"],
                                         vocab_size=CASE["vocab_size"])
    out.sum().backward()
    assert out.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    assert torch.isfinite(student.grad.float()).all()


def test_default_chunk_size_on_larger_input_matches_small_chunks():
    case = make_case(1, batch=3, seq=40, padded_vocab=256, vocab_size=250, top_k=20)
    errors = distill_errors(case, torch.float64, "topk_rkl_sg", "student", chunk_size=None)
    assert max(errors.values()) < 1e-9, errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="nope"), "loss="),
    (dict(loss="topk_rkl_sg", support="nope"), "support="),
    (dict(loss="sampled_pg"), "sampled_ids"),
    (dict(loss="topk_rkl_sg", support="given"), "support_ids"),
    (dict(loss="topk_rkl_sg", support="given", support_ids=torch.zeros(2, 5, 3, dtype=torch.long)),
     "support_ids shape"),
    (dict(loss="topk_rkl_sg", sampled_ids=torch.zeros(2, 4, dtype=torch.long)),
     "sampled_ids shape"),
    (dict(loss="topk_rkl_sg", sampled_ids=torch.full((2, 5), 45)), "sampled_ids has ids outside"),
    (dict(loss="topk_rkl_sg", loss_mask=torch.ones(5, 2)), "loss_mask"),
    (dict(loss="topk_rkl_sg", top_k=44), "top_k"),
    (dict(loss="topk_rkl_sg", vocab_size=49), "vocab_size"),
    (dict(loss="topk_rkl_sg", temperature=0.0), "temperature"),
    (dict(loss="jsd", beta=1.5), "beta"),
])
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    kwargs = {"top_k": 4, "vocab_size": 43, **kwargs}
    with pytest.raises(ValueError, match=match):
        vocab_parallel_distill_loss(CASE["student"], CASE["teacher"], **kwargs)


def test_student_teacher_shape_mismatch_raises():
    with pytest.raises(ValueError, match="teacher_logits"):
        vocab_parallel_distill_loss(CASE["student"], CASE["teacher"][..., :40], loss="full_rkl")


RENORMALISED = [name for name, objective in OBJECTIVES.items() if objective.support_only]


@pytest.mark.parametrize("support", ["teacher", "given"])
@pytest.mark.parametrize("loss", RENORMALISED)
def test_renormalised_reads_and_writes_only_the_support(loss, support):
    """The student's logits off the support are NaN: a pass that read any of them, forward or
    backward, would spread NaN into the value or the gradient. The gradient is exactly zero off
    the support and equal to the clean run's on it."""
    vocab, k = CASE["vocab_size"], CASE["top_k"]
    teacher_top = CASE["teacher"][..., :vocab].topk(k, -1).indices
    ids = {"teacher": teacher_top, "given": CASE["given"]}[support]
    on_support = torch.zeros(CASE["student"].shape, dtype=torch.bool).scatter_(-1, ids, True)
    poisoned = dict(CASE, student=torch.where(on_support, CASE["student"], torch.nan))
    value, grad = _grad(loss, case=poisoned, support=support, with_metrics=False)
    clean_value, clean_grad = _grad(loss, support=support, with_metrics=False)
    assert (grad[~on_support] == 0).all()
    torch.testing.assert_close(value, clean_value, rtol=0, atol=0)
    torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0)
    assert (grad[on_support] != 0).any()


@pytest.mark.parametrize("loss", RENORMALISED)
def test_renormalised_backward_keeps_no_logits(loss):
    student = CASE["student"].clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        vocab_parallel_distill_loss(student, CASE["teacher"], loss=loss, top_k=4,
                                    support="student", with_metrics=False)
    assert not [x.shape for x in saved if x.numel() >= student.numel()]


def test_sparse_gradient_is_zero_off_the_support_in_bf16():
    """The support-only backward scatters into a zero gradient (a kernel-zeroed mapping on CPU
    when large): every entry off the support reads back as zero, in the input dtype."""
    case = make_case(2, batch=2, seq=64, padded_vocab=4096, vocab_size=4000, top_k=20)
    student = case["student"].to(torch.bfloat16).requires_grad_()
    out, _ = vocab_parallel_distill_loss(student, case["teacher"].to(torch.bfloat16),
                                         loss="topk_mixed_norm", top_k=20, support="teacher",
                                         vocab_size=case["vocab_size"], with_metrics=False)
    out.sum().backward()
    # bf16 logits tie: the support is K of the ids at or above the K-th largest teacher logit.
    teacher = case["teacher"].to(torch.bfloat16).float()
    teacher[..., case["vocab_size"]:] = -torch.inf
    allowed = teacher >= teacher.topk(20, -1).values[..., -1:]
    nonzero = student.grad != 0
    assert student.grad.dtype == torch.bfloat16
    assert not (nonzero & ~allowed).any() and nonzero.any()
    assert (nonzero.sum(-1) <= 20).all()
