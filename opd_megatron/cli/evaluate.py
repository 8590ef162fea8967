"""`eval`: accuracy of a Megatron checkpoint on a prompt set under a reward function.

    python -m opd_megatron eval --megatron-dir DIR --data eval.jsonl --reward math \
        --samples-per-prompt 4 --temperature 0.6 --json

Reports pass@1 (the first sample of every prompt) and avg@k (the mean over all k samples).
"""
from __future__ import annotations

import json
import os

from opd_megatron.cli.generate import (add_sampling_arguments, check_sampling_arguments,
                                       generate_responses, sampling_from_args)
from opd_megatron.cli.loaded_model import add_layout_arguments


def add_parser(sub) -> None:
    parser = sub.add_parser("eval", help="accuracy of a checkpoint on a prompt set")
    add_layout_arguments(parser)
    parser.add_argument("--data", required=True, help="prompt dataset with `answer` fields")
    parser.add_argument("--reward", default="exact_match", help="reward plug-in name")
    parser.add_argument("--num-examples", type=int, default=0, help="0 = all")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_sampling_arguments(parser)


def accuracy_summary(scores: list[float], n: int) -> dict[str, float]:
    """pass@1 and avg@n from prompt-major scores (n samples per prompt)."""
    prompts = len(scores) // n
    first = [scores[i * n] for i in range(prompts)]
    return {"pass@1": sum(first) / max(prompts, 1), f"avg@{n}": sum(scores) / max(len(scores), 1),
            "num_prompts": prompts}


def check_reward_flag(name: str) -> None:
    from opd_megatron.config.loader import ConfigError
    from opd_megatron.rewards.registry import reward_names

    if name not in reward_names():
        raise ConfigError(f"--reward {name!r} is not a registered reward "
                          f"(known: {', '.join(sorted(reward_names()))})")


def run(args) -> int:
    from opd_megatron.cli.loaded_model import loaded_model
    from opd_megatron.data.dataset import load_prompt_dataset
    from opd_megatron.rewards.scoring import RewardScorer

    check_sampling_arguments(args)
    check_reward_flag(args.reward)
    dataset = load_prompt_dataset(args.data)
    count = len(dataset) if args.num_examples <= 0 else min(args.num_examples, len(dataset))
    examples = [dataset[i] for i in range(count)]
    scorer = RewardScorer(args.reward)
    with loaded_model(args) as model:
        rollouts, texts = generate_responses(model, examples, sampling_from_args(args))
        scores = scorer(texts, [examples[r.prompt_index] for r in rollouts]).scores
    summary = accuracy_summary(scores, args.samples_per_prompt)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary) if args.json else
              "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in summary.items()), flush=True)
    return 0
