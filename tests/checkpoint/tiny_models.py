"""Tiny random HF checkpoints of every supported architecture, built with transformers.

Every parameter (norms and biases included) is random, so a weight landing in the wrong place
changes the logits. Vocabulary sizes are not multiples of 128, so Megatron pads them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, rms_norm_eps=1e-5)


@dataclass(frozen=True)
class TinyModel:
    name: str
    config_class: str
    config: dict
    dtype: torch.dtype = torch.float32
    max_shard_size: str | None = None  # small enough to shard and exercise the index

    @property
    def num_kv_heads(self) -> int:
        return self.config["num_key_value_heads"]


MODELS = [
    TinyModel("llama3", "LlamaConfig",
              dict(COMMON, vocab_size=300, num_key_value_heads=2, rope_parameters=LLAMA3_ROPE,
                   tie_word_embeddings=False), max_shard_size="60KB"),
    # Multi-query attention (one KV head) with tied embeddings.
    TinyModel("llama_mqa", "LlamaConfig",
              dict(COMMON, vocab_size=250, num_key_value_heads=1, tie_word_embeddings=True)),
    TinyModel("qwen2", "Qwen2Config",
              dict(COMMON, vocab_size=300, num_key_value_heads=2, tie_word_embeddings=True,
                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
              max_shard_size="60KB"),
    TinyModel("qwen3", "Qwen3Config",
              dict(COMMON, vocab_size=333, num_key_value_heads=2, head_dim=32,
                   tie_word_embeddings=False)),
    # Stored in bf16: conversion keeps bf16, scoring upcasts it exactly to fp32.
    TinyModel("mistral", "MistralConfig",
              dict(COMMON, vocab_size=300, num_key_value_heads=2, head_dim=24, sliding_window=None,
                   tie_word_embeddings=False), dtype=torch.bfloat16, max_shard_size="40KB"),
]


def randomize_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            # Norm weights around 1, matrices and biases around 0 with a scale that keeps the
            # logits far from uniform (clear argmax margins).
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.15 * noise)


def build(model: TinyModel, out_dir: Path, seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    import transformers

    config = getattr(transformers, model.config_class)(**model.config)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    randomize_(hf, seed)
    hf = hf.to(model.dtype)
    kwargs = {"max_shard_size": model.max_shard_size} if model.max_shard_size else {}
    hf.save_pretrained(out_dir, **kwargs)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir


def reference_scores(hf_dir: Path, ids: list[int]) -> dict:
    """transformers' fp32 eager log p(token_t | tokens_<t) and argmax, as `score` reports them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return {"logprobs": logp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0],
            "argmax": logp.argmax(dim=-1)}
