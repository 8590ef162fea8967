"""`score`: log-probabilities and greedy next tokens of one token sequence under a Megatron checkpoint.

    torchrun --nproc-per-node 4 -m opd_megatron score --megatron-dir DIR --input-ids 1,5,9 \
        --tp 2 --pp 2 --json

The check that a converted checkpoint computes what the HF model computes, at any layout: rank 0
prints `logprobs` (log p(token_t | tokens_<t) for t >= 1) and `argmax` (the most likely next token
after every position), both over the real vocabulary (padding rows excluded).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from opd_megatron.config.schema import ParallelConfig


def add_parser(sub) -> None:
    parser = sub.add_parser("score", help="log-probs and argmax of a token sequence (checks a "
                                          "converted checkpoint)")
    parser.add_argument("--megatron-dir", required=True, help="Megatron checkpoint directory")
    parser.add_argument("--input-ids", required=True, help="comma-separated token ids, e.g. 1,5,9")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def parse_ids(text: str, vocab_size: int) -> list[int]:
    from opd_megatron.config.loader import ConfigError

    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--input-ids {text!r}: expected comma-separated integers") from None
    # A log-prob is of a token given the ones before it: one id has none to score.
    if len(ids) < 2 or any(not 0 <= i < vocab_size for i in ids):
        raise ConfigError(f"--input-ids needs at least two ids, each in [0, {vocab_size})")
    return ids


def score_loaded(chunks: list[torch.nn.Module], vocab_size: int, ids: list[int]) -> dict | None:
    """Score `ids` with loaded model chunks (collective over the model-parallel group).

    Returns {"logprobs", "argmax"} on the last pipeline stage's first tensor-parallel rank, None
    elsewhere.
    """
    from megatron.core import parallel_state as ps

    from opd_megatron.losses import vocab_parallel_logprobs
    from opd_megatron.losses._comm import resolve_tp_group
    from opd_megatron.losses.vocab_parallel import VocabShard, global_topk
    from opd_megatron.trainer.schedule import forward_outputs

    tokens = torch.tensor([ids])

    def scores(logits, mb):
        logits = logits.float()
        logprobs = vocab_parallel_logprobs(logits[:, :-1], mb["input_ids"][:, 1:],
                                           vocab_size=vocab_size)
        rows = logits.reshape(-1, logits.shape[-1])
        shard = VocabShard.of(rows.shape[-1], vocab_size, resolve_tp_group(None))
        _, argmax = global_topk(rows[:, :shard.valid], 1, shard)
        return {"logprobs": logprobs[0].tolist(), "argmax": argmax[:, 0].tolist()}

    out = forward_outputs(chunks, [{"input_ids": tokens}], scores)
    if out and ps.get_tensor_model_parallel_rank() == 0:
        return out[0]
    return None


def score_checkpoint(megatron_dir: str | Path, ids: list[int], parallel: ParallelConfig) -> dict:
    """Load `megatron_dir` at `parallel` (fp32) and score `ids`; every rank gets the result.

    Megatron must be initialised with `parallel` (opd_megatron.runtime.distributed.initialize).
    """
    from opd_megatron.cli.loaded_model import load_frozen

    arch, chunks = load_frozen(megatron_dir, parallel)
    mine = score_loaded(chunks, arch.vocab_size, ids)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return next(r for r in gathered if r is not None)


def run(args) -> int:
    from opd_megatron.checkpoint.megatron_dist import CheckpointError
    from opd_megatron.cli.loaded_model import checked_arch, megatron_for_checkpoint
    from opd_megatron.config.loader import ConfigError
    from opd_megatron.runtime import distributed as rd

    arch = checked_arch(args.megatron_dir)
    ids = parse_ids(args.input_ids, arch.vocab_size)
    with megatron_for_checkpoint(args.megatron_dir, args.tp, args.pp, seed=0,
                                 where="score --tp/--pp") as parallel:
        rank0 = rd.is_rank0()
        try:
            result = score_checkpoint(args.megatron_dir, ids, parallel)
        except CheckpointError as err:
            raise ConfigError(f"--megatron-dir: {err}") from None
    if rank0:
        if args.json:
            print(json.dumps({"input_ids": ids, **result}), flush=True)
        else:
            print("position  token  logprob      argmax")
            for t, token in enumerate(ids):
                lp = f"{result['logprobs'][t - 1]:.6f}" if t else "-"
                print(f"{t:8d}  {token:5d}  {lp:>11}  {result['argmax'][t]:6d}")
    return 0
