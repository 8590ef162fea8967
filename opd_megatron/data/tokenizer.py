"""One tokenizer interface for the whole project, over an HF tokenizer dir or a sentencepiece model.

Chat templates are rendered to text and then encoded without extra special tokens, so a prompt's
ids are the same whichever path produced them (templates carry their own BOS where they need one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

from opd_megatron.data.examples import Message


class Tokenizer(Protocol):
    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(self, messages: list[Message],
                            add_generation_prompt: bool = True) -> list[int]: ...


class HFTokenizer:
    def __init__(self, path: Path, chat_template_kwargs: dict[str, Any] | None = None):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if not self._tok.chat_template:
            raise ValueError(f"{path}: tokenizer has no chat template")
        if self._tok.eos_token_id is None:
            raise ValueError(f"{path}: tokenizer has no eos token")
        # e.g. {"enable_thinking": False} for Qwen3's non-thinking mode.
        self._template_kwargs = chat_template_kwargs or {}
        self.eos_token_id: int = self._tok.eos_token_id
        self.pad_token_id: int = (self._tok.pad_token_id if self._tok.pad_token_id is not None
                                  else self.eos_token_id)
        # len() counts added tokens, which the embedding must cover; .vocab_size does not.
        self.vocab_size: int = len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens,
                                clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[Message],
                            add_generation_prompt: bool = True) -> list[int]:
        text = self._tok.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             **self._template_kwargs)
        return self.encode(text)


class SentencePieceTokenizer:
    """A bare sentencepiece model has no chat template: a plain "role: content" one is built in."""

    def __init__(self, path: Path):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        if self._sp.eos_id() < 0:
            raise ValueError(f"{path}: sentencepiece model has no eos piece")
        self.eos_token_id: int = self._sp.eos_id()
        self.pad_token_id: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_token_id
        self.vocab_size: int = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # sentencepiece never renders control pieces (eos, pad) as text.
        return self._sp.decode(list(ids))

    def apply_chat_template(self, messages: list[Message],
                            add_generation_prompt: bool = True) -> list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages)
        return self.encode(text + ("assistant:" if add_generation_prompt else ""))


def load_tokenizer(path: str | Path, chat_template_kwargs: dict[str, Any] | None = None) -> Tokenizer:
    """An HF tokenizer directory (local files only) or a sentencepiece `.model` file."""
    path = Path(path)
    if path.is_dir():
        return HFTokenizer(path, chat_template_kwargs)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    raise ValueError(f"{path}: expected an HF tokenizer directory or a sentencepiece .model file")
