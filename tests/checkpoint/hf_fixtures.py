"""Hand-built HF checkpoints (no transformers): a config plus random tensors from the mapping's
specs, optionally mutated, for the unit and bad-input tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from opd_megatron.checkpoint.mapping import mapping_for
from opd_megatron.models.arch import ModelArch


def tiny_arch(model_type: str = "qwen2", **overrides) -> ModelArch:
    fields = dict(model_type=model_type, vocab_size=300, hidden_size=16, intermediate_size=24,
                  num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                  tie_word_embeddings=False)
    return ModelArch(**{**fields, **overrides})


def hf_state(arch: ModelArch, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in mapping_for(arch).hf_specs()}


def write_hf(out_dir: Path, arch: ModelArch, state: dict[str, torch.Tensor] | None = None,
             config: dict | None = None) -> Path:
    """One model.safetensors plus config.json (`config` overrides fields of arch's)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf_state(arch) if state is None else state, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps({**arch.to_hf_dict(), **(config or {})}))
    return out_dir
