"""`sft-traces`: the SFT warm-up's input, sampled from a teacher checkpoint.

    python -m opd_megatron sft-traces --megatron-dir TEACHER --prompts train.jsonl \
        --out sft_traces.jsonl --reward math --samples-per-prompt 4 --temperature 0.7
    (tools/make_sft_traces.py is the same command)

Every prompt row (the prompt-dataset format: `prompt` or `messages`, `answer`) gets
`--samples-per-prompt` teacher responses; with `--reward`, only those scoring at least
`--min-reward` are kept (rejection sampling). Each kept response is one SFT row
{"messages": [...], "response": "..."}. The file appears whole or not at all.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from opd_megatron.cli.generate import (add_sampling_arguments, check_sampling_arguments,
                                       generate_responses, sampling_from_args)
from opd_megatron.cli.loaded_model import add_layout_arguments


def add_parser(sub) -> None:
    parser = sub.add_parser("sft-traces", help="write SFT traces sampled from a teacher checkpoint")
    add_layout_arguments(parser)
    parser.add_argument("--prompts", required=True, help="prompt dataset (JSONL/Parquet)")
    parser.add_argument("--out", required=True, help="SFT dataset to write (JSONL)")
    parser.add_argument("--reward", help="keep only responses this reward scores >= --min-reward")
    parser.add_argument("--min-reward", type=float, default=1.0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    add_sampling_arguments(parser)


def run(args) -> int:
    from opd_megatron.cli.evaluate import check_reward_flag
    from opd_megatron.cli.loaded_model import loaded_model
    from opd_megatron.config.loader import ConfigError
    from opd_megatron.data.dataset import load_prompt_dataset
    from opd_megatron.rewards.scoring import RewardScorer

    out = Path(args.out)
    if out.suffix != ".jsonl":
        raise ConfigError(f"--out {out}: SFT traces are written as .jsonl")
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out}: already exists (pass --force to overwrite)")
    check_sampling_arguments(args)
    if args.reward:
        check_reward_flag(args.reward)
    examples = list(load_prompt_dataset(args.prompts))
    with loaded_model(args) as model:
        rollouts, texts = generate_responses(model, examples, sampling_from_args(args))
    sources = [examples[r.prompt_index] for r in rollouts]
    keep = [True] * len(texts)
    if args.reward:
        scores = RewardScorer(args.reward)(texts, sources).scores
        keep = [score >= args.min_reward for score in scores]
    rows = [json.dumps({"messages": ex.messages, "response": text})
            for ex, text, kept in zip(sources, texts, keep) if kept]
    if int(os.environ.get("RANK", "0")) == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
        tmp.write_text("".join(row + "\n" for row in rows))
        os.replace(tmp, out)
        print(json.dumps({"prompts": len(examples), "responses": len(texts), "kept": len(rows),
                          "out": str(out)}), flush=True)
    return 0
