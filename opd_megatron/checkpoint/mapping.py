"""The HF <-> Megatron parameter mapping: the only place that knows both naming schemes.

Every HF tensor is a `Piece` of one full (TP=1) Megatron tensor: a view of it, reshaped. Megatron
fuses q/k/v into `linear_qkv` group by group ([q_g; k_g; v_g] for each query group g, in the weight
and the bias), gate/up into `linear_fc1` ([gate; up]), and pads the vocabulary rows of the
embedding and output layer (padding rows are zero). Three users share this module: offline
conversion (convert.py), the Megatron -> HF export, and the live weight refit of a rollout engine.

Megatron names are the local layer spec's. The Transformer Engine spec fuses the pre-attention
and pre-MLP norms into `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight` (the same
keys megatron-core's dist checkpoints use for both specs); `canonical_megatron_name` maps those
back, so TE-spec models stream through the same functions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from opd_megatron.checkpoint.megatron_dist import ConversionError
from opd_megatron.models.arch import ModelArch
from opd_megatron.models.builder import padded_vocab_size

View = Callable[[torch.Tensor], torch.Tensor]


class MappingError(ConversionError):
    """Tensors that do not match the architecture: missing, unexpected or mis-shaped."""


@dataclass(frozen=True)
class Piece:
    """HF tensor `hf_name` (shape `hf_shape`) is `view(<Megatron tensor megatron_name>)`.

    The view has the same elements in the same order as the HF tensor, though not necessarily its
    shape (a q/k/v slice of the fused QKV is [groups, rows per group, hidden]).
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    megatron_name: str
    view: View

    def to_hf(self, megatron_tensor: torch.Tensor) -> torch.Tensor:
        return self.view(megatron_tensor).reshape(self.hf_shape)

    def fill(self, megatron_tensor: torch.Tensor, hf_tensor: torch.Tensor) -> None:
        if tuple(hf_tensor.shape) != self.hf_shape:
            raise MappingError(f"tensor {self.hf_name!r} has shape {list(hf_tensor.shape)}, the "
                               f"architecture needs {list(self.hf_shape)}")
        target = self.view(megatron_tensor)
        target.copy_(hf_tensor.reshape(target.shape))


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def _rows(start: int, stop: int) -> View:
    return lambda t: t[start:stop]


def _group_rows(groups: int, start: int, stop: int) -> View:
    """Rows [start, stop) of every query group of a fused QKV weight or bias."""
    return lambda t: t.view(groups, -1, *t.shape[1:])[:, start:stop]


class DecoderMapping:
    """The Llama layout, which the other architectures extend: RMSNorm, SwiGLU, RoPE, GQA."""

    def __init__(self, arch: ModelArch, padded_vocab: int | None = None):
        self.arch = arch
        self.padded_vocab = padded_vocab or padded_vocab_size(arch.vocab_size, 1)
        if self.padded_vocab < arch.vocab_size:
            raise MappingError(f"padded vocabulary {self.padded_vocab} is smaller than "
                               f"vocab_size={arch.vocab_size}")
        self.pieces = list(self._pieces())
        self.by_hf = {p.hf_name: p for p in self.pieces}
        self.megatron_shapes = dict(self._megatron_shapes())

    # --- what the architectures differ in --------------------------------------------------

    def attention_pieces(self, hf: str, mg: str) -> Iterator[Piece]:
        """HF self_attn tensors of one layer, in HF order (`hf`, `mg`: the layer prefixes)."""
        a = self.arch
        h, d, heads, groups = a.hidden_size, a.head_dim, a.num_attention_heads, a.num_key_value_heads
        q_rows = heads // groups * d
        for proj, (start, stop), rows in (("q", (0, q_rows), heads * d),
                                          ("k", (q_rows, q_rows + d), groups * d),
                                          ("v", (q_rows + d, q_rows + 2 * d), groups * d)):
            yield Piece(f"{hf}self_attn.{proj}_proj.weight", (rows, h),
                        f"{mg}self_attention.linear_qkv.weight", _group_rows(groups, start, stop))
            if a.qkv_bias:
                yield Piece(f"{hf}self_attn.{proj}_proj.bias", (rows,),
                            f"{mg}self_attention.linear_qkv.bias", _group_rows(groups, start, stop))
        yield Piece(f"{hf}self_attn.o_proj.weight", (h, heads * d),
                    f"{mg}self_attention.linear_proj.weight", _whole)

    def ignorable_hf_names(self) -> re.Pattern:
        """HF tensors that transformers itself ignores when loading this architecture."""
        ignored = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]
        if self.arch.tie_word_embeddings:
            ignored.append(r"lm_head\.weight")  # some tied checkpoints store the copy anyway
        return re.compile("|".join(ignored))

    # --- shared layout -----------------------------------------------------------------------

    def _pieces(self) -> Iterator[Piece]:
        a = self.arch
        h, ffn, vocab = a.hidden_size, a.intermediate_size, a.vocab_size
        yield Piece("model.embed_tokens.weight", (vocab, h), "embedding.word_embeddings.weight",
                    _rows(0, vocab))
        for i in range(a.num_layers):
            hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
            yield from self.attention_pieces(hf, mg)
            yield Piece(f"{hf}mlp.gate_proj.weight", (ffn, h), f"{mg}mlp.linear_fc1.weight",
                        _rows(0, ffn))
            yield Piece(f"{hf}mlp.up_proj.weight", (ffn, h), f"{mg}mlp.linear_fc1.weight",
                        _rows(ffn, 2 * ffn))
            yield Piece(f"{hf}mlp.down_proj.weight", (h, ffn), f"{mg}mlp.linear_fc2.weight", _whole)
            yield Piece(f"{hf}input_layernorm.weight", (h,), f"{mg}input_layernorm.weight", _whole)
            yield Piece(f"{hf}post_attention_layernorm.weight", (h,),
                        f"{mg}pre_mlp_layernorm.weight", _whole)
        yield Piece("model.norm.weight", (h,), "decoder.final_layernorm.weight", _whole)
        if not a.tie_word_embeddings:
            yield Piece("lm_head.weight", (vocab, h), "output_layer.weight", _rows(0, vocab))

    def _megatron_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Full (TP=1) shape of every Megatron tensor the pieces come from."""
        a = self.arch
        qkv_rows = (a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim
        fused = {"linear_qkv.weight": (qkv_rows, a.hidden_size), "linear_qkv.bias": (qkv_rows,),
                 "linear_fc1.weight": (2 * a.intermediate_size, a.hidden_size)}
        vocab_rows = {"embedding.word_embeddings.weight", "output_layer.weight"}
        for piece in self.pieces:
            name = piece.megatron_name
            suffix = ".".join(name.split(".")[-2:])
            if name in vocab_rows:
                yield name, (self.padded_vocab, a.hidden_size)
            else:
                yield name, fused.get(suffix, piece.hf_shape)

    def hf_specs(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, shape) of every HF tensor, in HF order."""
        return [(p.hf_name, p.hf_shape) for p in self.pieces]

    def check_hf_shapes(self, shapes: dict[str, tuple[int, ...]],
                        where: Callable[[str | None], str]) -> None:
        """Refuse missing, unexpected and mis-shaped HF tensors before reading any of them;
        `where(name)` says which file holds `name` (which checkpoint for None)."""
        ignorable = self.ignorable_hf_names()
        for name in shapes:
            if name not in self.by_hf and not ignorable.fullmatch(name):
                raise MappingError(f"{where(name)}: unexpected tensor {name!r} for "
                                   f"{self.arch.model_type}")
        for piece in self.pieces:
            if piece.hf_name not in shapes:
                raise MappingError(f"{where(None)}: tensor {piece.hf_name!r} is missing")
            if tuple(shapes[piece.hf_name]) != piece.hf_shape:
                raise MappingError(f"{where(piece.hf_name)}: tensor {piece.hf_name!r} has shape "
                                   f"{list(shapes[piece.hf_name])}, the config needs "
                                   f"{list(piece.hf_shape)}")


class LlamaMapping(DecoderMapping):
    """Llama 2/3 (Llama 3 RoPE scaling lives in the config; the weights are plain Llama)."""


class MistralMapping(DecoderMapping):
    """Mistral: Llama weights; head_dim may differ from hidden/heads (Mistral Nemo)."""


class Qwen2Mapping(DecoderMapping):
    """Qwen2/2.5: Llama plus q/k/v biases (attention_pieces adds them via arch.qkv_bias)."""


class Qwen3Mapping(DecoderMapping):
    """Qwen3: Llama plus per-head RMSNorm on queries and keys (QK-norm), no biases."""

    def attention_pieces(self, hf: str, mg: str) -> Iterator[Piece]:
        yield from super().attention_pieces(hf, mg)
        d = self.arch.head_dim
        yield Piece(f"{hf}self_attn.q_norm.weight", (d,),
                    f"{mg}self_attention.q_layernorm.weight", _whole)
        yield Piece(f"{hf}self_attn.k_norm.weight", (d,),
                    f"{mg}self_attention.k_layernorm.weight", _whole)


MAPPINGS: dict[str, type[DecoderMapping]] = {
    "llama": LlamaMapping,
    "mistral": MistralMapping,
    "qwen2": Qwen2Mapping,
    "qwen3": Qwen3Mapping,
}


def mapping_for(arch: ModelArch, padded_vocab: int | None = None) -> DecoderMapping:
    """The mapping of `arch`; Megatron vocabulary tensors have `padded_vocab` rows (default: the
    TP=1 padding to a multiple of 128)."""
    if arch.model_type not in MAPPINGS:
        raise MappingError(f"no weight mapping for model_type {arch.model_type!r} "
                           f"(supported: {', '.join(MAPPINGS)})")
    return MAPPINGS[arch.model_type](arch, padded_vocab)


_TE_NAMES = (
    (re.compile(r"(\.|^)self_attention\.linear_qkv\.layer_norm_weight$"), r"\1input_layernorm.weight"),
    (re.compile(r"(\.|^)mlp\.linear_fc1\.layer_norm_weight$"), r"\1pre_mlp_layernorm.weight"),
)


def canonical_megatron_name(name: str) -> str:
    """Local-spec name of a Megatron parameter (strips a DDP `module.` prefix, maps TE names)."""
    name = name.removeprefix("module.")
    for pattern, replacement in _TE_NAMES:
        name = pattern.sub(replacement, name)
    return name


def megatron_to_hf_tensors(arch: ModelArch, megatron_state: Iterable[tuple[str, torch.Tensor]],
                           padded_vocab: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn full (TP=1) Megatron (name, tensor) pairs into HF (name, tensor) pairs, in HF order.

    Megatron tensors may arrive in any order; each is kept only until its last HF piece is out, so
    a source that yields tensors in model order holds at most about one layer. The HF tensors are
    views where the layout allows (copies for q/k/v): copy them before changing the source.
    """
    mapping = mapping_for(arch, padded_vocab)
    uses: dict[str, int] = {}
    for piece in mapping.pieces:
        uses[piece.megatron_name] = uses.get(piece.megatron_name, 0) + 1
    pending: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    order = iter(mapping.pieces)
    piece = next(order, None)
    for raw_name, tensor in megatron_state:
        name = canonical_megatron_name(raw_name)
        if name.endswith("._extra_state"):
            continue
        if name not in mapping.megatron_shapes:
            raise MappingError(f"unexpected Megatron tensor {raw_name!r} for {arch.model_type}")
        if name in seen:
            raise MappingError(f"Megatron tensor {raw_name!r} given twice")
        expected = mapping.megatron_shapes[name]
        if tuple(tensor.shape) != expected:
            raise MappingError(f"Megatron tensor {raw_name!r} has shape {list(tensor.shape)}, "
                               f"expected {list(expected)} (full, TP=1)")
        seen.add(name)
        pending[name] = tensor
        while piece is not None and piece.megatron_name in pending:
            yield piece.hf_name, piece.to_hf(pending[piece.megatron_name])
            uses[piece.megatron_name] -= 1
            if not uses[piece.megatron_name]:
                del pending[piece.megatron_name]
            piece = next(order, None)
    if piece is not None:
        raise MappingError(f"Megatron tensor {piece.megatron_name!r} is missing "
                           f"(needed for {piece.hf_name!r})")


def hf_to_megatron_tensors(arch: ModelArch, hf_state: Iterable[tuple[str, torch.Tensor]],
                           padded_vocab: int | None = None,
                           dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn HF (name, tensor) pairs into full (TP=1) Megatron (name, tensor) pairs.

    A Megatron tensor is yielded as soon as all of its HF pieces have arrived (vocabulary padding
    rows are zero); `dtype` defaults to that of its first piece.
    """
    mapping = mapping_for(arch, padded_vocab)
    ignorable = mapping.ignorable_hf_names()
    missing: dict[str, set[str]] = {}
    for piece in mapping.pieces:
        missing.setdefault(piece.megatron_name, set()).add(piece.hf_name)
    building: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state:
        piece = mapping.by_hf.get(name)
        if piece is None:
            if ignorable.fullmatch(name):
                continue
            raise MappingError(f"unexpected HF tensor {name!r} for {arch.model_type}")
        target = piece.megatron_name
        if name not in missing.get(target, ()):
            raise MappingError(f"HF tensor {name!r} given twice")
        if target not in building:
            building[target] = torch.zeros(mapping.megatron_shapes[target],
                                           dtype=dtype or tensor.dtype)
        piece.fill(building[target], tensor)
        missing[target].discard(name)
        if not missing[target]:
            del missing[target]
            yield target, building.pop(target)
    if missing:
        target, names = next(iter(missing.items()))
        raise MappingError(f"HF tensor {sorted(names)[0]!r} is missing (needed for {target!r})")
