from __future__ import annotations

import pytest

from opd_megatron.data.encoding import encode_prompt, encode_sft
from opd_megatron.data.examples import PromptExample, SFTExample
from opd_megatron.data.privileged import DEFAULT_PI_TEMPLATES, PIConfig, PIMode

USER = [{"role": "user", "content": "12+345="}]
EXAMPLE = PromptExample(messages=USER, answer="357", solution="2+5=7, 1+4=5, 0+3=3, so 357",
                        system_prompt="Say ANSWER.", index=4)
GEN = "<|im_start|>assistant\n"


def render(tok, example, pi=None):
    return tok.decode(encode_prompt(tok, example, pi))


def test_student_prompt_has_no_privileged_info(tok):
    assert render(tok, EXAMPLE) == f"<|im_start|>user\n12+345=<|im_end|>\n{GEN}"


def test_system_prompt_mode_uses_example_rule(tok):
    text = render(tok, EXAMPLE, PIConfig(PIMode.SYSTEM_PROMPT, system_prompt="configured"))
    assert text == f"<|im_start|>system\nSay ANSWER.<|im_end|>\n<|im_start|>user\n12+345=<|im_end|>\n{GEN}"


def test_system_prompt_mode_falls_back_to_configured_rule(tok):
    example = PromptExample(messages=USER, answer="357")
    text = render(tok, example, PIConfig("system_prompt", system_prompt="configured"))
    assert text.startswith("<|im_start|>system\nconfigured<|im_end|>\n<|im_start|>user\n12+345=")


def test_system_prompt_mode_keeps_dataset_system_turn_after_rule(tok):
    example = PromptExample(messages=[{"role": "system", "content": "be brief"}, *USER], answer="357",
                            system_prompt="rule")
    text = render(tok, example, PIConfig("system_prompt"))
    assert text.startswith("<|im_start|>system\nrule\n\nbe brief<|im_end|>\n<|im_start|>user\n")
    assert example.messages[0]["content"] == "be brief"


def test_system_prompt_mode_without_rule_is_an_error(tok):
    with pytest.raises(ValueError, match="example 7: PI mode 'system_prompt' needs"):
        encode_prompt(tok, PromptExample(messages=USER, answer="1", index=7), PIConfig("system_prompt"))


def test_answer_only_mode(tok):
    text = render(tok, EXAMPLE, PIConfig(PIMode.ANSWER_ONLY))
    assert text == (f"<|im_start|>user\n12+345=\n\n(The reference answer is 357.)<|im_end|>\n{GEN}")
    assert EXAMPLE.messages == USER


def test_full_solution_mode(tok):
    text = render(tok, EXAMPLE, PIConfig("full_solution"))
    expected = DEFAULT_PI_TEMPLATES[PIMode.FULL_SOLUTION].format(prompt="12+345=",
                                                                 solution=EXAMPLE.solution)
    assert text == f"<|im_start|>user\n{expected}<|im_end|>\n{GEN}"


def test_custom_template(tok):
    text = render(tok, EXAMPLE, PIConfig("answer_only", template="Answer {answer}. {prompt}"))
    assert text == f"<|im_start|>user\nAnswer 357. 12+345=<|im_end|>\n{GEN}"


def test_template_errors(tok):
    with pytest.raises(ValueError, match=r"unknown placeholders \['gold'\]"):
        PIConfig("answer_only", template="{prompt} {gold}")
    with pytest.raises(ValueError, match="'bogus' is not a valid PIMode"):
        PIConfig("bogus")
    with pytest.raises(ValueError, match="example 2: PI template needs a 'solution' field"):
        encode_prompt(tok, PromptExample(messages=USER, answer="1", index=2), PIConfig("full_solution"))


def test_sft_loss_mask_covers_exactly_response_and_eos(tok):
    example = SFTExample(messages=[{"role": "system", "content": "r"}, *USER],
                         response="2+5=7, so \\boxed{357}")
    ids, mask = encode_sft(tok, example)
    assert len(ids) == len(mask)
    prompt = tok.apply_chat_template(example.messages)
    assert ids[:len(prompt)] == prompt
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    assert ids[-1] == tok.eos_token_id
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == example.response + "<|im_end|>"
