"""FP8 post-training quantization of a final HF student for serving (nvidia-modelopt, one GPU).

    python tools/quantize_fp8.py --hf-dir runs/opd/hf --out runs/opd/hf_fp8 \
        --calib-data data/train.jsonl --num-calib 512

Weights and activations of every linear layer become FP8 (E4M3, per-tensor scales calibrated on
the prompts); the output is an HF checkpoint with a modelopt quantization config that vLLM and
TensorRT-LLM serve directly. Calibration rows are the project's prompt rows: `prompt` (a string)
or `messages` (chat turns, rendered with the model's chat template), or raw `text`.

Needs CUDA and nvidia-modelopt (both in the docker/Dockerfile image); without them it stops with
a one-line error.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELOPT_HINT = "pip install -e '.[gpu]' (nvidia-modelopt) or use the docker/Dockerfile image"


class ToolError(RuntimeError):
    """A one-line, user-facing error."""


def check_gpu_stack():
    """modelopt's quantization module, or ToolError naming what is missing."""
    import torch

    if not torch.cuda.is_available():
        raise ToolError("FP8 quantization needs a CUDA GPU and none is visible "
                        "(torch.cuda.is_available() is False)")
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as err:
        message = f"FP8 quantization needs nvidia-modelopt ({err}); {MODELOPT_HINT}"
        raise ToolError(message) from None
    return mtq


def calibration_texts(path: Path, num: int, chat_template) -> list[str]:
    """The first `num` prompts of a JSONL file, as the model would see them.

    `chat_template(messages) -> str` renders chat turns (with the generation prompt).
    """
    if not path.is_file():
        raise ToolError(f"--calib-data {path}: no such file")
    texts = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if len(texts) == num:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ToolError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            if isinstance(row.get("messages"), list):
                texts.append(chat_template(row["messages"]))
            elif isinstance(row.get("prompt"), str):
                texts.append(chat_template([{"role": "user", "content": row["prompt"]}]))
            elif isinstance(row.get("text"), str):
                texts.append(row["text"])
            else:
                raise ToolError(f"{path}:{line_no}: a row needs 'prompt', 'messages' or 'text'")
    if not texts:
        raise ToolError(f"{path}: no calibration prompts")
    return texts


def chat_renderer(tokenizer):
    if getattr(tokenizer, "chat_template", None):
        return lambda messages: tokenizer.apply_chat_template(messages, tokenize=False,
                                                              add_generation_prompt=True)
    return lambda messages: "\n".join(m["content"] for m in messages)


def quantize_fp8(model, tokenizer, texts: list[str], max_length: int, mtq):
    """Calibrate and quantize `model` in place (FP8 weights and activations)."""
    import torch

    device = next(model.parameters()).device

    def forward_loop(m):
        with torch.no_grad():
            for text in texts:
                batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
                m(**batch.to(device))

    return mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True, type=Path, help="HF checkpoint of the student")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    parser.add_argument("--calib-data", required=True, type=Path, help="JSONL of prompts")
    parser.add_argument("--num-calib", type=int, default=512, help="calibration prompts (512)")
    parser.add_argument("--max-length", type=int, default=2048, help="tokens per prompt (2048)")
    args = parser.parse_args(argv)
    try:
        mtq = check_gpu_stack()
        if args.out.exists():
            raise ToolError(f"--out {args.out} already exists")
        if not (args.hf_dir / "config.json").is_file():
            raise ToolError(f"--hf-dir {args.hf_dir}: no config.json (not an HF checkpoint)")
        if args.num_calib < 1:
            raise ToolError("--num-calib must be >= 1")
        import torch
        from modelopt.torch.export import export_hf_checkpoint
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
        texts = calibration_texts(args.calib_data, args.num_calib, chat_renderer(tokenizer))
        start = time.perf_counter()
        # .cuda() rather than device_map: device_map needs accelerate, which the stack lacks.
        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.bfloat16).cuda().eval()
        quantize_fp8(model, tokenizer, texts, args.max_length, mtq)
        export_hf_checkpoint(model, export_dir=args.out)
        tokenizer.save_pretrained(args.out)
    except ToolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"FP8 checkpoint written to {args.out} ({len(texts)} calibration prompts, "
          f"{time.perf_counter() - start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
