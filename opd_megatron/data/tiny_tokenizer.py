"""A tiny HF fast tokenizer built locally (no download) for the synthetic tasks and the CPU demo.

Character level over printable ASCII, plus whole-word tokens for the chat roles, `\\boxed` and the
hedging words the OPD diagnostics count, and ChatML special tokens. About 110 ids.
"""
from __future__ import annotations

import re
import string
from pathlib import Path

PAD, UNK, IM_START, IM_END = "<pad>", "<unk>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, UNK, IM_START, IM_END)
HEDGING_WORDS = ("wait", "but", "maybe", "Wait", "But", "Maybe")
WORDS = ("system", "user", "assistant", "\\boxed", *HEDGING_WORDS)
CHARS = tuple(string.digits + string.ascii_letters + string.punctuation + " \n")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_tokenizer(out_dir: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and the chat template to `out_dir`, loadable
    with `transformers.AutoTokenizer.from_pretrained(out_dir)`. Decoding is the exact inverse of
    encoding for any printable-ASCII text."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *WORDS, *CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Longest words first so "assistant" wins over its letters; anything else is one character.
    words = "|".join(re.escape(w) for w in sorted(WORDS, key=len, reverse=True))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{words}|[\\s\\S]"), behavior="isolated")
    # Fuse joins tokens with nothing in between (WordLevel would put spaces back).
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK,
                                 eos_token=IM_END, chat_template=CHATML_TEMPLATE,
                                 clean_up_tokenization_spaces=False)
    out = Path(out_dir)
    hf.save_pretrained(str(out))
    return out
