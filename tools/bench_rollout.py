"""Rollout throughput: the native Megatron engine against vLLM's CPU build, same weights, prompts
and lengths.

    python tools/bench_rollout.py --out runs/bench/rollout.md [--rounds 3] [--models demo,100m]

For each model (random weights, fp32, Megatron TP=1): both engines are built once over the same
student, then each round samples the same prompts with each engine in turn (interleaved, so both
see the same machine state), greedy-free T=1 sampling with a fixed seed, a fixed number of new
tokens (no stop token). Tokens/s = generated tokens / seconds of `generate` (the vLLM refit before
each generation included, as a run pays it). The table gives the median over rounds. Models:
`demo`, the demo's teacher shape (the demo's student has head_dim 24, which vLLM's CPU attention
does not take); `100m`, a Llama-shaped ~100M-parameter model.

Runs in one process (a one-rank process group). Record the machine load with the numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MODELS = {
    "demo": dict(model_type="qwen3", vocab_size=64, hidden_size=128, intermediate_size=256,
                 num_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=True),
    "100m": dict(model_type="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                 num_layers=8, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                 tie_word_embeddings=False),
}


def parameters(arch) -> int:
    attention = arch.hidden_size * arch.head_dim * (2 * arch.num_attention_heads
                                                    + 2 * arch.num_key_value_heads)
    layer = attention + 3 * arch.hidden_size * arch.intermediate_size
    heads = 1 if arch.tie_word_embeddings else 2
    return arch.num_layers * layer + heads * arch.vocab_size * arch.hidden_size


def bench_model(name: str, batch: int, prompt_len: int, new_tokens: int, rounds: int) -> dict:
    import torch

    from opd_megatron.config.schema import ParallelConfig, PrecisionConfig
    from opd_megatron.models.arch import ModelArch
    from opd_megatron.models.builder import build_model_chunks
    from opd_megatron.rollout.base import SamplingParams
    from opd_megatron.rollout.native import NativeRolloutEngine
    from opd_megatron.rollout.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine

    arch = ModelArch(**MODELS[name])
    chunks = build_model_chunks(arch, ParallelConfig(), PrecisionConfig())
    for chunk in chunks:
        chunk.eval()
    engines = {
        "native": NativeRolloutEngine(chunks, arch, eos_token_ids=None, pad_token_id=0,
                                      max_batch_size=batch),
        "vllm": VLLMRolloutEngine(VLLMEngineConfig(max_model_len=prompt_len + new_tokens,
                                                   dtype="float32",
                                                   cpu_kv_cache_sequences=batch),
                                  arch, chunks=chunks),
    }
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, arch.vocab_size, (batch, prompt_len), generator=generator).tolist()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=1)
    for engine in engines.values():      # warm-up: first-call allocations
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, seed=0))
    rates: dict[str, list[float]] = {key: [] for key in engines}
    for _ in range(rounds):
        for key, engine in engines.items():
            start = time.perf_counter()
            rollouts = engine.generate(prompts, sampling)
            seconds = time.perf_counter() - start
            rates[key].append(sum(len(r.response_ids) for r in rollouts) / seconds)
    return {"model": name, "params": parameters(arch), "batch": batch,
            **{key: statistics.median(values) for key, values in rates.items()},
            "spread": {key: (min(v), max(v)) for key, v in rates.items()}}


def table(rows: list[dict], load: str) -> str:
    lines = ["| model | parameters | batch | native tok/s | vLLM CPU tok/s | vLLM / native |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | "
                     f"{r['native']:.0f} | {r['vllm']:.0f} | {r['vllm'] / r['native']:.1f}x |")
    return "\n".join(lines) + f"\n\nMedian of interleaved rounds; load average at the start: {load}.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "bench" / "rollout.md")
    parser.add_argument("--models", default="demo,100m")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        print(f"--models: unknown {unknown}; choose from {sorted(MODELS)}", file=sys.stderr)
        return 2
    from opd_megatron.config.schema import ParallelConfig
    from opd_megatron.runtime import distributed as rd

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rd.initialize(ParallelConfig(), seed=0)
    rows = [bench_model(name, int(batch), args.prompt_len, args.new_tokens, args.rounds)
            for name in names for batch in args.batches.split(",")]
    rd.shutdown()
    text = table(rows, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial")
    partial.write_text(text)
    partial.replace(args.out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
