from __future__ import annotations

import pytest

from opd_megatron.data.answer_format import (RULE_SYSTEM_PROMPT, extract_boxed, extract_rule_answer,
                                             format_boxed, format_rule_answer)
from opd_megatron.data.dataset import load_prompt_dataset, load_sft_dataset
from opd_megatron.data.synthetic import AdditionProblem, addition_problems, write_addition_datasets


def test_generator_is_deterministic_and_distinct():
    a = addition_problems(50, digits=2, seed=7)
    assert a == addition_problems(50, digits=2, seed=7)
    assert a != addition_problems(50, digits=2, seed=8)
    assert len(set(a)) == 50
    assert all(0 <= p.a < 100 and 0 <= p.b < 100 for p in a)
    with pytest.raises(ValueError, match="only 100 distinct"):
        addition_problems(101, digits=1)


def test_problem_text():
    p = AdditionProblem(47, 85)
    assert (p.prompt, p.answer) == ("47+85=", "132")
    assert p.solution == "7+5=12, 4+8+1=13, so 132"
    assert p.response(rule=False) == "7+5=12, 4+8+1=13, so 132\n\\boxed{132}"
    assert p.response(rule=True) == "7+5=12, 4+8+1=13, so 132\nANSWER: 132"
    assert AdditionProblem(0, 0).solution == "0+0=0, so 0"


def test_answer_formats_round_trip():
    assert extract_boxed("x " + format_boxed("357")) == "357"
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("no box") is None and extract_boxed("\\boxed{12") is None
    assert extract_rule_answer("work\n" + format_rule_answer("-42") + "\n") == "-42"


@pytest.mark.parametrize("text", ["ANSWER: 357 extra", "answer: 357", "ANSWER: 357\nmore", "\\boxed{357}",
                                  "", "ANSWER:357"])
def test_rule_non_compliance(text):
    assert extract_rule_answer(text) is None


def test_written_datasets_load(tmp_path):
    files = write_addition_datasets(tmp_path, num_train=6, num_eval=3, digits=2, seed=1)
    again = write_addition_datasets(tmp_path / "again", num_train=6, num_eval=3, digits=2, seed=1)
    assert all(files[name].read_text() == again[name].read_text() for name in files)
    train = load_prompt_dataset(files["prompts_train"])
    evaluation = load_prompt_dataset(files["prompts_eval"])
    assert len(train) == 6 and len(evaluation) == 3
    assert not {ex.messages[0]["content"] for ex in train} & {ex.messages[0]["content"] for ex in evaluation}
    assert train[0].system_prompt is None and train[0].solution
    rule = load_prompt_dataset(files["rule_prompts_train"])
    assert rule[0].system_prompt == RULE_SYSTEM_PROMPT and rule[0].messages == train[0].messages
    sft, sft_rule = load_sft_dataset(files["sft_train"]), load_sft_dataset(files["sft_rule_train"])
    assert extract_boxed(sft[0].response) == train[0].answer
    assert sft_rule[0].messages[0] == {"role": "system", "content": RULE_SYSTEM_PROMPT}
    assert extract_rule_answer(sft_rule[0].response) == train[0].answer
