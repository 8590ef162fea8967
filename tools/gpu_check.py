"""One-GPU check of the production path; prints one markdown table (run by tools/gpu_check.sh).

Rows, each independent (a failure is printed in its row and the others still run):
  environment     versions of torch, CUDA, Transformer Engine, vLLM, modelopt
  forward bf16    tiny Megatron GPT (TE layers when importable) vs the same weights in fp32
  forward fp8/*   the same under each Transformer Engine FP8 recipe (when TE is importable)
  loss <name>     every distillation loss and its gradient on the device vs CPU float64
  opd step        student forward, loss vs a frozen teacher, backward, optimizer step (x steps)
  vllm refit      colocated vLLM engine: refit from the student, sample, gen_kl_error vs Megatron
  checkpoint *    a CPU-converted HF checkpoint loaded into TE fp32 / bf16 / FP8 models, logits
                  vs transformers (no `_extra_state` in the checkpoint; fp32 runs on a CPU too)
  fp8 train       FP8 train steps on odd sequence lengths through the project's own batching
  opd eval        the OPD recipe's evaluation sampling (T=0.6) through its vLLM engine (top-p)
  refit after train  gen_kl_error before and after a train step; refit bytes = parameter bytes
  memory          free GPU memory around vLLM sleep / wake / a train step (no growth per cycle)
  fp8 export      tools/quantize_fp8.py on the HF checkpoint, served by vLLM

Each row has a number and passes, fails or is skipped; sizes are tiny: the whole check takes
well under 10 minutes on one H100/H200. Exit status 1 when a row failed. `--device cpu --only
losses` exercises the loss rows on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from opd_megatron.models.arch import ModelArch  # noqa: E402

ARCH = ModelArch(model_type="qwen3", vocab_size=1024, hidden_size=256, intermediate_size=512,
                 num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 tie_word_embeddings=True, max_position_embeddings=512)
BATCH, SEQ = 2, 128            # FP8 GEMMs want every dimension a multiple of 16
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
GROUPS = ("environment", "forward", "losses", "opd", "vllm", "checkpoint", "fp8train", "eval",
          "refit", "memory", "export")


class Skip(Exception):
    """The row does not apply on this machine."""


class Table:
    """Rows are printed as they finish, so a run cut short still shows what it reached."""

    def __init__(self):
        self.failed = self.rows = 0
        print("| # | check | status | detail | s |\n|---|---|---|---|---|", flush=True)

    def row(self, name: str, check: Callable[[], str]) -> None:
        start = time.perf_counter()
        self.rows += 1
        try:
            status, detail = "pass", check()
        except Skip as why:
            status, detail = "skip", str(why)
        except Exception as err:  # noqa: BLE001 - any failure is a row of the report
            self.failed += 1
            status = "fail"
            detail = f"{type(err).__name__}: {err}".replace("\n", " ")[:300]
            traceback.print_exc(file=sys.stderr)
        detail = detail.replace("|", "/")
        print(f"| {self.rows} | {name} | {status} | {detail} | {time.perf_counter() - start:.1f} |",
              flush=True)


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

    inputs = model_inputs(tokens.to(next(chunks[0].parameters()).device))
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
        state["student"], state["teacher"] = student, teacher
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
        _need_vllm(device)
        from opd_megatron.rollout.base import SamplingParams
        from opd_megatron.rollout.refit import verify_refit
        from opd_megatron.stages.rollouts import score_rollouts

        chunks = _student(state).chunks
        engine = _engine(state)
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


def _need_vllm(device: str) -> None:
    _need_cuda(device)
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        raise Skip(f"vllm is not importable ({err})") from None


def _need_te(device: str) -> None:
    _need_cuda(device)
    from opd_megatron.models.precision import DeviceCaps

    if not DeviceCaps.detect().transformer_engine:
        raise Skip("Transformer Engine is not importable")


def _student(state: dict):
    if "student" not in state:
        state["student"], state["teacher"] = _student_and_teacher()
    return state["student"]


# The OPD recipe's rollout sampling (T=1.0, top_p=0.95): its engine reports raw log-probs.
OPD_RECIPE = REPO / "conf" / "opd_qwen3_1p7b_from_qwen3_1p7b_grpo_tp1_dp8.yaml"


def _recipe():
    from opd_megatron.config.loader import load_config
    from opd_megatron.stages.config import StageConfig

    return load_config(OPD_RECIPE, StageConfig, ["eval.max_new_tokens=32", "eval.samples_per_prompt=2",
                                                 "rollout.max_new_tokens=32"])


def _engine(state: dict):
    """One colocated engine for the vLLM rows, configured as the OPD recipe configures it."""
    if "engine" not in state:
        import dataclasses

        from opd_megatron.rollout.vllm_engine import VLLMRolloutEngine, engine_config

        config = dataclasses.replace(engine_config(_recipe(), ARCH), gpu_memory_utilization=0.3,
                                     max_model_len=256)
        state["engine"] = VLLMRolloutEngine(config, ARCH, chunks=_student(state).chunks)
    return state["engine"]


def _hf_checkpoint(state: dict) -> Path:
    """A random tiny HF Qwen3 (fp32 safetensors, with the tiny tokenizer) of ARCH's shape."""
    if "hf_dir" not in state:
        from transformers import Qwen3Config, Qwen3ForCausalLM

        from opd_megatron.data.tiny_tokenizer import build_tiny_tokenizer

        root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        hf_dir = build_tiny_tokenizer(root / "hf")
        torch.manual_seed(5)
        config = Qwen3Config(vocab_size=ARCH.vocab_size, hidden_size=ARCH.hidden_size,
                             intermediate_size=ARCH.intermediate_size,
                             num_hidden_layers=ARCH.num_layers,
                             num_attention_heads=ARCH.num_attention_heads,
                             num_key_value_heads=ARCH.num_key_value_heads, head_dim=ARCH.head_dim,
                             tie_word_embeddings=True, max_position_embeddings=512)
        model = Qwen3ForCausalLM(config)
        with torch.no_grad():   # norms away from 1, so a norm loaded in the wrong place shows
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.uniform_(0.5, 1.5)
        model.save_pretrained(hf_dir)
        state["hf_dir"], state["hf_model"] = hf_dir, model
    return state["hf_dir"]


def _run(*cmd: str, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} exited {proc.returncode}: {proc.stderr[-300:]}")
    return proc


def _converted(state: dict) -> Path:
    """The HF checkpoint converted on the CPU, as users convert (the tool hides the GPU)."""
    if "megatron_dir" not in state:
        hf_dir = _hf_checkpoint(state)
        out = hf_dir.parent / "megatron"
        _run(sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(hf_dir),
             "--out", str(out), "--no-progress", timeout=300)
        state["megatron_dir"] = out
    return state["megatron_dir"]


def checkpoint_check(device: str, state: dict, precision_name: str, tolerance: float):
    """fp32 runs on a CPU too (local layer spec): the conversion, load and comparison path."""
    def check() -> str:
        if precision_name != "fp32":
            _need_te(device)
        from opd_megatron.checkpoint.megatron_dist import load_model, read_arch
        from opd_megatron.config.schema import PrecisionConfig

        megatron_dir = _converted(state)
        _megatron()
        kwargs = {"fp8_recipe": "tensorwise"} if precision_name == "fp8" else {}
        chunks = _model(PrecisionConfig(precision=precision_name, **kwargs))
        load_model(chunks, megatron_dir)      # TE modules' _extra_state is not in the checkpoint
        tokens = _tokens(3)
        hf = state["hf_model"].float().to(device)
        with torch.no_grad():
            ref = hf(tokens.to(device)).logits.float()
        out = _forward(chunks, tokens)
        error = float((out - ref).norm() / ref.norm())
        if read_arch(megatron_dir) != ARCH or error > tolerance:
            raise RuntimeError(f"relative logits error vs transformers {error:.2e} > {tolerance:.0e}")
        return f"relative logits error vs transformers (fp32) {error:.2e}"
    return check


def fp8_train_check(device: str):
    def check() -> str:
        _need_te(device)
        from opd_megatron.config.schema import OptimizerConfig, ParallelConfig, PrecisionConfig
        from opd_megatron.data.shapes import ShapeContract
        from opd_megatron.losses import vocab_parallel_cross_entropy_loss
        from opd_megatron.stages.batching import shifted_microbatches
        from opd_megatron.trainer.engine import build_trainable

        _megatron()
        precision = PrecisionConfig(precision="fp8", fp8_recipe="tensorwise")
        model = build_trainable(ARCH, ParallelConfig(), precision, OptimizerConfig(lr=1e-3),
                                total_steps=10)
        shapes = ShapeContract.for_run(precision, ParallelConfig())
        gen = torch.Generator().manual_seed(11)

        def loss_fn(logits, mb):
            tokens = mb["loss_mask"].sum()
            loss = vocab_parallel_cross_entropy_loss(logits, mb["labels"], mb["loss_mask"],
                                                     num_tokens=1.0, vocab_size=ARCH.vocab_size)
            return loss, tokens, {"loss": loss.detach() / tokens}

        widths, losses = [], []
        for step, lengths in enumerate(([37, 53], [91, 100], [17, 129])):
            seqs = [torch.randint(0, ARCH.vocab_size, (n,), generator=gen).tolist()
                    for n in lengths]
            mbs = shifted_microbatches(seqs, [[0] + [1] * (n - 1) for n in lengths], 1, 0,
                                       shapes=shapes)
            for mb in mbs:
                mb["input_ids"], mb["labels"] = mb["input_ids"].cuda(), mb["labels"].cuda()
                mb["loss_mask"] = mb["loss_mask"].cuda()
            widths.append(mbs[0]["input_ids"].shape[1])
            metrics, info = model.train_step(mbs, loss_fn)
            losses.append(float(sum(m["loss"] for m in metrics) / len(metrics)))
            if not (info["update_applied"] and all(map(math.isfinite, losses))):
                raise RuntimeError(f"step {step}: update skipped or non-finite loss ({losses})")
        return f"sequence lengths {widths} (odd inputs padded to 16), losses {losses}"
    return check


def opd_eval_check(device: str, state: dict):
    def check() -> str:
        _need_vllm(device)
        from opd_megatron.stages.context import StageContext

        cfg = _recipe()
        ctx = StageContext(cfg=cfg, arch=ARCH, model=None, tokenizer=None, tokenizer_dir="",
                           dp_rank=0, dp_size=1)
        engine, prompts = _engine(state), _tokens(4)[:, :16].tolist()
        evaluated = engine.generate(prompts, ctx.eval_sampling())
        trained = engine.generate(prompts, ctx.training_sampling(step=0))
        if len(evaluated) != len(prompts) * cfg.eval.samples_per_prompt or not trained:
            raise RuntimeError(f"{len(evaluated)} eval rollouts for {len(prompts)} prompts")
        return (f"eval at T={cfg.eval.temperature} and rollout at T={cfg.rollout.temperature}, "
                f"top_p={cfg.rollout.top_p} on a {engine.config.logprobs_mode} engine")
    return check


def refit_after_train_check(device: str, state: dict):
    def check() -> str:
        _need_vllm(device)
        from opd_megatron.rollout.base import SamplingParams
        from opd_megatron.rollout.refit import verify_refit
        from opd_megatron.stages.rollouts import score_rollouts

        student, engine = _student(state), _engine(state)
        prompts, sampling = _tokens(5)[:, :16].tolist(), SamplingParams(max_new_tokens=32, seed=1)
        score = score_rollouts(student.chunks, ARCH.vocab_size)
        before = verify_refit(engine, prompts, sampling, score)["gen_kl_error"]
        student.train_step([{"input_ids": _tokens(6).cuda()}], _opd_loss(state["teacher"]))
        engine.update_weights(student.chunks)
        after = verify_refit(engine, prompts, sampling, score)["gen_kl_error"]
        params = sum(p.numel() * p.element_size() for c in student.chunks for p in c.parameters())
        sent = engine.last_refit.bytes
        if max(before, after) > 1e-2 or sent != params:
            raise RuntimeError(f"gen_kl_error {before:.2e} -> {after:.2e}; refit {sent} bytes, "
                               f"parameters {params} bytes")
        return f"gen_kl_error {before:.2e} before, {after:.2e} after; refit {sent} bytes = params"
    return check


def memory_check(device: str, state: dict):
    def check() -> str:
        _need_vllm(device)
        from opd_megatron.rollout.base import SamplingParams

        student, engine = _student(state), _engine(state)

        def free_gib() -> float:
            torch.cuda.synchronize()
            return torch.cuda.mem_get_info()[0] / 2**30

        asleep, trained = [], []
        for _ in range(3):
            engine.generate(_tokens(7)[:, :16].tolist(), SamplingParams(max_new_tokens=16))
            asleep.append(free_gib())
            student.train_step([{"input_ids": _tokens(8).cuda()}], _opd_loss(state["teacher"]))
            trained.append(free_gib())
        detail = (f"free GiB with vLLM asleep {[round(f, 2) for f in asleep]}, after a train step "
                  f"{[round(f, 2) for f in trained]}")
        if asleep[-1] < asleep[0] - 1.0:
            raise RuntimeError("free memory shrinks every sleep/wake/train cycle: " + detail)
        return detail
    return check


SERVE_FP8 = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, gpu_memory_utilization=0.2,
          max_model_len=256, enforce_eager=True)
out = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}],
                   SamplingParams(max_tokens=8, min_tokens=8, detokenize=False))
print(json.dumps({"tokens": len(out[0].outputs[0].token_ids),
                  "quantization": llm.llm_engine.vllm_config.model_config.quantization}))
"""


def fp8_export_check(device: str, state: dict):
    def check() -> str:
        _need_vllm(device)
        hf_dir = _hf_checkpoint(state)
        calib = hf_dir.parent / "calib.jsonl"
        calib.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(8)))
        out = hf_dir.parent / "hf_fp8"
        _run(sys.executable, "tools/quantize_fp8.py", "--hf-dir", str(hf_dir), "--out", str(out),
             "--calib-data", str(calib), "--num-calib", "8", "--max-length", "32", timeout=240)
        served = json.loads(_run(sys.executable, "-c", SERVE_FP8, str(out),
                                 timeout=240).stdout.strip().splitlines()[-1])
        if served["tokens"] != 8 or "fp8" not in str(served["quantization"]).lower():
            raise RuntimeError(f"vLLM served the export as {served}")
        return f"vLLM loads the export (quantization {served['quantization']}), 8 tokens sampled"
    return check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cuda", "cpu"))
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups: {', '.join(GROUPS)}")
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
        "checkpoint": [("checkpoint fp32", checkpoint_check(args.device, state, "fp32", 1e-4)),
                       ("checkpoint bf16", checkpoint_check(args.device, state, "bf16", 2e-2)),
                       ("checkpoint fp8", checkpoint_check(args.device, state, "fp8", 0.25))],
        "fp8train": [("fp8 train", fp8_train_check(args.device))],
        "eval": [("opd eval", opd_eval_check(args.device, state))],
        "refit": [("refit after train", refit_after_train_check(args.device, state))],
        "memory": [("memory", memory_check(args.device, state))],
        "export": [("fp8 export", fp8_export_check(args.device, state))],
    }
    assert tuple(rows) == GROUPS
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
