"""One-GPU check of the production path; prints one markdown table (run by tools/gpu_check.sh).

Rows, each independent (a failure is printed in its row and the others still run):
  environment     versions of torch, CUDA, Transformer Engine, vLLM, modelopt
  forward bf16    tiny Megatron GPT (TE layers when importable) vs the same weights in fp32
  forward fp8/*   the same under each Transformer Engine FP8 recipe (when TE is importable)
  loss <name>     every distillation loss and its gradient on the device vs CPU float64
  opd step        student forward, loss vs a frozen teacher, backward, optimizer step (x steps)
  vllm refit      colocated vLLM engine: refit from the student, sample, gen_kl_error vs Megatron

Sizes are tiny: the whole check takes well under 5 minutes on one H100/H200. Exit status 1 when
a row failed. `--device cpu --only losses` exercises the loss rows on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opd_megatron.models.arch import ModelArch  # noqa: E402

ARCH = ModelArch(model_type="qwen3", vocab_size=1024, hidden_size=256, intermediate_size=512,
                 num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 tie_word_embeddings=True, max_position_embeddings=512)
BATCH, SEQ = 2, 128            # FP8 GEMMs want every dimension a multiple of 16
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")


class Skip(Exception):
    """The row does not apply on this machine."""


class Table:
    """Rows are printed as they finish, so a run cut short still shows what it reached."""

    def __init__(self):
        self.failed = 0
        print("| check | status | detail | s |\n|---|---|---|---|", flush=True)

    def row(self, name: str, check: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            status, detail = "ok", check()
        except Skip as why:
            status, detail = "skip", str(why)
        except Exception as err:  # noqa: BLE001 - any failure is a row of the report
            self.failed += 1
            status = "FAIL"
            detail = f"{type(err).__name__}: {err}".replace("\n", " ")[:300]
            traceback.print_exc(file=sys.stderr)
        detail = detail.replace("|", "/")
        print(f"| {name} | {status} | {detail} | {time.perf_counter() - start:.1f} |", flush=True)


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as err:  # noqa: BLE001 - absent or broken: say which
        return f"n/a ({type(err).__name__})"


def environment(device: str) -> str:
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none"
    return (f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {gpu}, "
            f"TE {_version('transformer_engine')}, vllm {_version('vllm')}, "
            f"modelopt {_version('modelopt')}")


def _need_cuda(device: str) -> None:
    if device != "cuda":
        raise Skip("needs CUDA")


def _tokens(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, ARCH.vocab_size, (BATCH, SEQ), generator=gen)


def _megatron():
    """Megatron's parallel state on this one GPU (once per process)."""
    from opd_megatron.config.schema import ParallelConfig
    from opd_megatron.runtime import distributed as rd

    if not torch.distributed.is_initialized():
        rd.initialize(ParallelConfig(), seed=1234)


def _forward(chunks, tokens: torch.Tensor) -> torch.Tensor:
    from opd_megatron.trainer.schedule import model_inputs

    inputs = model_inputs(tokens.cuda())
    with torch.no_grad():
        logits = chunks[0](inputs["input_ids"], inputs["position_ids"], inputs["attention_mask"])
    return logits[..., :ARCH.vocab_size].float()


def _model(precision):
    from opd_megatron.config.schema import ParallelConfig
    from opd_megatron.trainer.engine import build_frozen

    return build_frozen(ARCH, ParallelConfig(), precision)


def _copy_weights(source, target) -> None:
    params = dict(source[0].named_parameters())
    with torch.no_grad():
        for name, param in target[0].named_parameters():
            param.copy_(params[name])


def forward_check(device: str, precision_name: str, recipe: str | None, tolerance: float):
    def check() -> str:
        _need_cuda(device)
        from opd_megatron.config.schema import PrecisionConfig
        from opd_megatron.models.precision import DeviceCaps

        if recipe and not DeviceCaps.detect().transformer_engine:
            raise Skip("Transformer Engine is not importable")
        _megatron()
        reference = _model(PrecisionConfig(precision="fp32"))
        kwargs = {"fp8_recipe": recipe} if recipe else {}
        model = _model(PrecisionConfig(precision=precision_name, **kwargs))
        _copy_weights(reference, model)
        tokens = _tokens(0)
        ref, out = _forward(reference, tokens), _forward(model, tokens)
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite logits")
        error = float((out - ref).norm() / ref.norm())
        spec = type(model[0].decoder.layers[0].self_attention.linear_qkv).__name__
        if error > tolerance:
            raise RuntimeError(f"relative logits error {error:.2e} > {tolerance:.0e} ({spec})")
        return f"relative logits error vs fp32 {error:.2e} ({spec})"
    return check


def loss_check(device: str, loss: str):
    def check() -> str:
        from opd_megatron.losses import vocab_parallel_distill_loss

        gen = torch.Generator().manual_seed(7)
        student = torch.randn(BATCH, 32, ARCH.vocab_size, generator=gen, dtype=torch.float64) * 3
        teacher = torch.randn(BATCH, 32, ARCH.vocab_size, generator=gen, dtype=torch.float64) * 3
        sampled = torch.randint(0, ARCH.vocab_size, (BATCH, 32), generator=gen)

        def run(dtype, dev):
            s = student.to(dev, dtype, copy=True).requires_grad_()
            per_token, _ = vocab_parallel_distill_loss(
                s, teacher.to(dev, dtype), loss=loss, top_k=16, support="student",
                sampled_ids=sampled.to(dev))
            per_token.sum().backward()
            return per_token.detach().double().cpu(), s.grad.double().cpu()

        ref_loss, ref_grad = run(torch.float64, "cpu")
        got_loss, got_grad = run(torch.float32, device)
        loss_err = float((got_loss - ref_loss).abs().max() / ref_loss.abs().max().clamp_min(1e-12))
        grad_err = float((got_grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-12))
        detail = f"fp32 {device} vs fp64 CPU: loss {loss_err:.1e}, grad {grad_err:.1e}"
        if max(loss_err, grad_err) > 1e-4:
            raise RuntimeError(detail)
        return detail
    return check


def _opd_loss(teacher):
    from opd_megatron.losses import vocab_parallel_distill_loss
    from opd_megatron.trainer.schedule import model_inputs

    def loss_fn(logits, mb):
        inputs = model_inputs(mb["input_ids"])
        with torch.no_grad():
            t_logits = teacher[0](inputs["input_ids"], inputs["position_ids"],
                                  inputs["attention_mask"])
        per_token, _ = vocab_parallel_distill_loss(logits, t_logits, loss="topk_rkl_sg", top_k=16,
                                                   vocab_size=ARCH.vocab_size)
        total = per_token.sum()
        return total, torch.tensor(per_token.numel()), {"loss": total.detach() / per_token.numel()}
    return loss_fn


def _student_and_teacher():
    from opd_megatron.config.schema import OptimizerConfig, ParallelConfig, PrecisionConfig
    from opd_megatron.runtime.distributed import seed_everything
    from opd_megatron.trainer.engine import build_trainable

    _megatron()
    precision = PrecisionConfig(precision="bf16")
    student = build_trainable(ARCH, ParallelConfig(), precision,
                              OptimizerConfig(lr=3e-3, warmup_steps=0), total_steps=20)
    seed_everything(99)   # a teacher with other weights than the student's
    return student, _model(precision)


def opd_step_check(device: str, state: dict):
    def check() -> str:
        _need_cuda(device)
        student, teacher = _student_and_teacher()
        state["student"] = student
        tokens = _tokens(1).cuda()
        microbatches = [{"input_ids": tokens}]
        losses = []
        for _ in range(5):
            metrics, info = student.train_step(microbatches, _opd_loss(teacher))
            losses.append(float(metrics[0]["loss"]))
            if not info["update_applied"]:
                raise RuntimeError("the optimizer skipped the update")
        if not losses[-1] < losses[0]:
            raise RuntimeError(f"loss did not decrease: {losses}")
        return (f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in 5 steps, "
                f"grad_norm {info['grad_norm']:.3f}")
    return check


def vllm_check(device: str, state: dict):
    def check() -> str:
        _need_cuda(device)
        try:
            import vllm  # noqa: F401
        except ImportError as err:
            raise Skip(f"vllm is not importable ({err})") from None
        from opd_megatron.rollout.base import SamplingParams
        from opd_megatron.rollout.refit import verify_refit
        from opd_megatron.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine
        from opd_megatron.stages.rollouts import score_rollouts

        if "student" not in state:
            state["student"], _ = _student_and_teacher()
        chunks = state["student"].chunks
        engine = VLLMRolloutEngine(
            VLLMEngineConfig(gpu_memory_utilization=0.3, max_model_len=256),
            ARCH, chunks=chunks)
        prompts = _tokens(2)[:, :16].tolist()
        sampling = SamplingParams(temperature=1.0, max_new_tokens=32, n=2, seed=0)
        metrics = verify_refit(engine, prompts, sampling, score_rollouts(chunks, ARCH.vocab_size))
        refit = engine.last_refit
        if metrics["gen_kl_error"] > 1e-2:
            raise RuntimeError(f"gen_kl_error {metrics['gen_kl_error']:.2e} > 1e-2: the refit "
                               f"weights differ from the student's ({metrics})")
        return (f"gen_kl_error {metrics['gen_kl_error']:.2e} over {metrics['gen_tokens']:.0f} "
                f"tokens, max |dlogp| {metrics['gen_logprob_max_abs_diff']:.2e}; refit "
                f"{refit.tensors} tensors in {refit.buckets} buckets, {refit.seconds:.2f}s")
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cuda", "cpu"))
    parser.add_argument("--only", default="environment,forward,losses,opd,vllm",
                        help="comma-separated groups: environment, forward, losses, opd, vllm")
    args = parser.parse_args(argv)
    groups = set(args.only.split(","))
    from opd_megatron.losses import LOSSES

    state: dict = {}
    rows = {
        "environment": [("environment", lambda: environment(args.device))],
        "forward": [("forward bf16", forward_check(args.device, "bf16", None, 2e-2))]
                   + [(f"forward fp8/{r}", forward_check(args.device, "fp8", r, 0.25))
                      for r in FP8_RECIPES],
        "losses": [(f"loss {name}", loss_check(args.device, name)) for name in LOSSES],
        "opd": [("opd step", opd_step_check(args.device, state))],
        "vllm": [("vllm refit", vllm_check(args.device, state))],
    }
    unknown = groups - set(rows)
    if unknown:
        parser.error(f"unknown groups: {', '.join(sorted(unknown))}")
    table = Table()
    for group, group_rows in rows.items():
        if group in groups:
            for name, check in group_rows:
                table.row(name, check)
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
