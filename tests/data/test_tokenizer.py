from __future__ import annotations

import io
import json

import pytest
import sentencepiece
from transformers import AutoTokenizer

from opd_megatron.data.synthetic import addition_problems
from opd_megatron.data.tiny_tokenizer import HEDGING_WORDS, IM_END, PAD
from opd_megatron.data.tokenizer import HFTokenizer, SentencePieceTokenizer, load_tokenizer

TASK_STRINGS = [
    "12+345=",
    *[p.response(rule) for p in addition_problems(5, digits=3, seed=3) for rule in (False, True)],
    "wait, but maybe \\boxed{\\frac{1}{2}} is -7?\n\n(The reference answer is 357.)",
    "  leading and trailing spaces  ",
]


@pytest.mark.parametrize("text", TASK_STRINGS)
def test_tiny_tokenizer_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_tiny_tokenizer_is_tiny_and_has_specials(tok):
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size < 128
    assert tok.decode([tok.eos_token_id]) == IM_END and tok.decode([tok.pad_token_id]) == PAD
    for word in HEDGING_WORDS:
        assert len(tok.encode(word)) == 1


def test_auto_tokenizer_loads_tiny_tokenizer(tiny_tokenizer_dir):
    hf = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir), local_files_only=True)
    assert hf.eos_token == IM_END and hf.pad_token == PAD
    text = hf.apply_chat_template([{"role": "system", "content": "rule"},
                                   {"role": "user", "content": "1+2="}],
                                  tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nrule<|im_end|>\n<|im_start|>user\n1+2=<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_chat_template_ids(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "1+2="}])
    assert tok.decode(ids) == "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    no_gen = tok.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=False)
    assert ids[:len(no_gen)] == no_gen and len(ids) > len(no_gen)
    assert tok.decode(ids, skip_special_tokens=True) == "user\n1+2=\nassistant\n"


def test_tokenizer_dir_without_chat_template(tmp_path, tiny_tokenizer_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((tiny_tokenizer_dir / name).read_text())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_tok"):
        load_tokenizer(tmp_path / "missing_tok")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    buffer = io.BytesIO()
    lines = ["12+345=357", "user: hello assistant: system", "\\boxed{7} ANSWER: 3"] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=48, model_type="char",
        pad_id=3, user_defined_symbols=["\n"], normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tok.model"
    path.write_bytes(buffer.getvalue())
    return path


def test_sentencepiece_wrapper(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 3)
    assert tok.decode(tok.encode("12+345=357")) == "12+345=357"
    ids = tok.apply_chat_template([{"role": "user", "content": "1+2="}])
    assert tok.decode(ids) == "user: 1+2=\n\nassistant:"
    assert tok.decode(ids + [tok.eos_token_id]) == tok.decode(ids)
