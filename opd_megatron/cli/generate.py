"""`generate`: sample responses from a Megatron checkpoint with the native engine.

    python -m opd_megatron generate --megatron-dir DIR --prompt "12+7=" --temperature 0
    torchrun --nproc-per-node 2 -m opd_megatron generate --megatron-dir DIR --tp 2 \
        --prompts data/eval.jsonl --out runs/gen.jsonl
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from opd_megatron.cli.loaded_model import add_layout_arguments


def add_parser(sub) -> None:
    parser = sub.add_parser("generate", help="sample responses from a Megatron checkpoint")
    add_layout_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a user message (repeatable)")
    source.add_argument("--prompts", help="prompt dataset (JSONL/Parquet with prompt or messages)")
    add_sampling_arguments(parser)
    parser.add_argument("--out", help="write one JSON line per response here (default: stdout)")


def add_sampling_arguments(parser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--samples-per-prompt", type=int, default=1)


def check_sampling_arguments(args) -> None:
    """One line naming the flag, before any model is loaded."""
    from opd_megatron.config.loader import ConfigError

    for flag, ok, rule in (
            ("--temperature", args.temperature >= 0, ">= 0 (0 is greedy)"),
            ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"),
            ("--top-k", args.top_k >= 0, ">= 0 (0 disables it)"),
            ("--max-new-tokens", args.max_new_tokens >= 1, ">= 1"),
            ("--samples-per-prompt", args.samples_per_prompt >= 1, ">= 1")):
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ConfigError(f"{flag}={value} must be {rule}")


def sampling_from_args(args):
    from opd_megatron.rollout.base import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, n=args.samples_per_prompt,
                          seed=args.seed)


def generate_responses(model, examples: list, sampling) -> tuple[list, list[str]]:
    """(rollouts, decoded responses) of a LoadedModel for prompt examples (no PI)."""
    from opd_megatron.data.encoding import encode_prompt

    rollouts = model.engine.generate([encode_prompt(model.tokenizer, ex) for ex in examples],
                                     sampling)
    return rollouts, [model.tokenizer.decode(r.response_ids, skip_special_tokens=True)
                      for r in rollouts]


def run(args) -> int:
    from opd_megatron.cli.loaded_model import loaded_model
    from opd_megatron.data.dataset import load_prompt_dataset
    from opd_megatron.data.examples import PromptExample

    check_sampling_arguments(args)
    if args.prompts:
        examples = list(load_prompt_dataset(args.prompts))
    else:
        examples = [PromptExample(messages=[{"role": "user", "content": p}], answer="", index=i)
                    for i, p in enumerate(args.prompt)]
    with loaded_model(args) as model:
        rollouts, texts = generate_responses(model, examples, sampling_from_args(args))
        lines = [json.dumps({"prompt_index": r.prompt_index, "response": text,
                             "response_ids": r.response_ids, "finish_reason": r.finish_reason,
                             "mean_logprob": sum(r.logprobs) / max(len(r.logprobs), 1)})
                 for r, text in zip(rollouts, texts)]
    if int(os.environ.get("RANK", "0")) == 0:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(lines) + "\n")
        else:
            print("\n".join(lines), flush=True)
    return 0
