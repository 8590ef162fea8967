"""The architecture of a decoder-only model, read from (and written back to) an HF config.json.

One dataclass describes Llama 3, Mistral, Qwen2/2.5 and Qwen3: they differ only in QKV bias,
QK-norm, head dim, RoPE scaling and embedding tying. Everything that builds a Megatron model or
maps weights reads this object, never the raw HF dict.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# HF `model_type` -> (HF architectures entry, QKV bias, QK-norm).
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "llama": ("LlamaForCausalLM", False, False),
    "mistral": ("MistralForCausalLM", False, False),
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", False, True),
}


class ArchitectureError(ValueError):
    """A model config that Megatron cannot represent or that this project does not support."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (`rope_scaling.rope_type == "llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra_hf_fields: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def qkv_bias(self) -> bool:
        return ARCHITECTURES[self.model_type][1]

    @property
    def qk_norm(self) -> bool:
        return ARCHITECTURES[self.model_type][2]

    @property
    def hf_architecture(self) -> str:
        return ARCHITECTURES[self.model_type][0]

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ArchitectureError(f"model_type {self.model_type!r} is not supported "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ArchitectureError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ArchitectureError(f"{name} must be positive, got {getattr(self, name)}")

    # --- HF config.json ---------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelArch":
        model_type = cfg.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ArchitectureError(f"{source}: model_type {model_type!r} is not supported "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            head_dim = cfg.get("head_dim") or hidden // heads
            if cfg.get("rope_parameters"):  # transformers >= 5 nests RoPE settings here
                rope = dict(cfg["rope_parameters"])
            else:
                rope = dict(cfg.get("rope_scaling") or {})
                rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "llama3"):
                raise ArchitectureError(f"{source}: rope type {rope_type!r} is not supported "
                                        "(supported: default, llama3)")
            scaling = None
            if rope_type == "llama3":
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                    high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                    original_max_position_embeddings=int(
                        rope.get("original_max_position_embeddings", 8192)))
            if cfg.get("attention_bias") and model_type != "qwen2":
                raise ArchitectureError(f"{source}: attention_bias=true is only supported for qwen2")
            # The Megatron model is built with SwiGLU and bias-free MLPs whatever the config says.
            if cfg.get("hidden_act", "silu") != "silu":
                raise ArchitectureError(f"{source}: hidden_act={cfg['hidden_act']!r} is not "
                                        "supported (supported: silu)")
            if cfg.get("mlp_bias"):
                raise ArchitectureError(f"{source}: mlp_bias=true is not supported")
            sliding = cfg.get("sliding_window")
            if sliding and cfg.get("use_sliding_window", model_type == "mistral"):
                max_pos = int(cfg.get("max_position_embeddings", 4096))
                if sliding < max_pos:
                    raise ArchitectureError(
                        f"{source}: sliding_window={sliding} attention is not supported")
            known = {"model_type", "vocab_size", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                     "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                     "eos_token_id", "architectures"}
            return cls(
                model_type=model_type,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope.get("rope_theta", 10000.0)),
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                extra_hf_fields={k: v for k, v in cfg.items() if k not in known},
            )
        except KeyError as missing:
            raise ArchitectureError(f"{source}: missing field {missing.args[0]!r}") from None

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "ModelArch":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise ArchitectureError(f"{cfg_path}: no such file")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as err:
            raise ArchitectureError(f"{cfg_path}: not valid JSON ({err})") from None
        return cls.from_hf_dict(cfg, source=str(cfg_path))

    def to_hf_dict(self) -> dict[str, Any]:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta,
                    **dataclasses.asdict(self.rope_scaling)}
        cfg = {
            **self.extra_hf_fields,
            "architectures": [self.hf_architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "rope_scaling": None if self.rope_scaling is None else rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": self.qkv_bias,
        }
        for key in ("bos_token_id", "eos_token_id"):
            if getattr(self, key) is not None:
                cfg[key] = getattr(self, key)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArch":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)
