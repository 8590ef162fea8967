"""Seeded synthetic verifiable tasks for the tests and the embedded CPU demo.

(a) Addition of two numbers of up to `digits` digits; the response works the columns right to left
and ends with `\\boxed{sum}`. (b) The same problems under a shared system-prompt rule: the answer
must end with an `ANSWER: <n>` line (answer_format.RULE_SYSTEM_PROMPT).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from opd_megatron.data.answer_format import RULE_SYSTEM_PROMPT, format_boxed, format_rule_answer


@dataclass(frozen=True)
class AdditionProblem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def solution(self) -> str:
        """Column sums from the ones digit up, e.g. 47+85: "7+5=12, 4+8+1=13, so 132"."""
        a, b, carry, steps = self.a, self.b, 0, []
        while a or b or not steps:
            total = a % 10 + b % 10 + carry
            terms = [a % 10, b % 10] + ([carry] if carry else [])
            steps.append("+".join(map(str, terms)) + f"={total}")
            a, b, carry = a // 10, b // 10, total // 10
        return f"{', '.join(steps)}, so {self.answer}"

    def response(self, rule: bool) -> str:
        final = format_rule_answer(self.answer) if rule else format_boxed(self.answer)
        return f"{self.solution}\n{final}"


def addition_problems(count: int, *, digits: int = 2, seed: int = 0) -> list[AdditionProblem]:
    """`count` distinct problems with operands in [0, 10**digits), in seeded order."""
    if count > 10 ** (2 * digits):
        raise ValueError(f"only {10 ** (2 * digits)} distinct {digits}-digit problems, asked {count}")
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < count:
        pair = (rng.randrange(10 ** digits), rng.randrange(10 ** digits))
        if pair not in seen:
            seen.add(pair)
            problems.append(AdditionProblem(*pair))
    return problems


def prompt_rows(problems: Iterable[AdditionProblem], *, rule: bool = False) -> list[dict[str, Any]]:
    """Prompt-dataset rows; with `rule` the rule rides along as privileged `system_prompt`."""
    extra = {"system_prompt": RULE_SYSTEM_PROMPT} if rule else {}
    return [{"prompt": p.prompt, "answer": p.answer, "solution": p.solution, **extra}
            for p in problems]


def sft_rows(problems: Iterable[AdditionProblem], *, rule: bool = False) -> list[dict[str, Any]]:
    """SFT rows; with `rule` the rule is a visible system turn and responses follow it, which is
    how a teacher learns to obey the rule before OPSD moves it into the student."""
    if not rule:
        return [{"prompt": p.prompt, "response": p.response(rule=False)} for p in problems]
    return [{"messages": [{"role": "system", "content": RULE_SYSTEM_PROMPT},
                          {"role": "user", "content": p.prompt},
                          {"role": "assistant", "content": p.response(rule=True)}]}
            for p in problems]


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def write_addition_datasets(out_dir: str | Path, *, num_train: int, num_eval: int, digits: int = 2,
                            seed: int = 0) -> dict[str, Path]:
    """The demo's files; train and eval problems are disjoint. Keys name the files."""
    problems = addition_problems(num_train + num_eval, digits=digits, seed=seed)
    train, evaluation = problems[:num_train], problems[num_train:]
    out = Path(out_dir)
    files = {
        "sft_train": sft_rows(train), "sft_rule_train": sft_rows(train, rule=True),
        "prompts_train": prompt_rows(train), "prompts_eval": prompt_rows(evaluation),
        "rule_prompts_train": prompt_rows(train, rule=True),
        "rule_prompts_eval": prompt_rows(evaluation, rule=True),
    }
    return {name: write_jsonl(rows, out / f"{name}.jsonl") for name, rows in files.items()}
