"""Privileged information (PI) for OPSD: how the teacher's prompt differs from the student's.

`system_prompt` is a rule shared by all examples (the student can absorb it); `answer_only` and
`full_solution` are per-instance and inserted into the last user turn through a template
(docs/LOSSES.md, "OPSD").
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from enum import Enum

from opd_megatron.data.examples import Message, PromptExample


class PIMode(str, Enum):
    SYSTEM_PROMPT = "system_prompt"
    ANSWER_ONLY = "answer_only"
    FULL_SOLUTION = "full_solution"


# Placeholders: {prompt} (the last user turn), {answer}, {solution}.
DEFAULT_PI_TEMPLATES: dict[PIMode, str] = {
    PIMode.ANSWER_ONLY: "{prompt}\n\n(The reference answer is {answer}.)",
    PIMode.FULL_SOLUTION: "{prompt}\n\n(A reference solution: {solution})",
}
_PLACEHOLDERS = {"prompt", "answer", "solution"}


@dataclass(frozen=True)
class PIConfig:
    mode: PIMode
    # system_prompt mode: used when an example has no `system_prompt` of its own.
    system_prompt: str | None = None
    # answer_only / full_solution: None means DEFAULT_PI_TEMPLATES[mode].
    template: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", PIMode(self.mode))
        unknown = _fields(self.template) - _PLACEHOLDERS if self.template is not None else set()
        if unknown:
            raise ValueError(f"PI template has unknown placeholders {sorted(unknown)}; "
                             f"known: {sorted(_PLACEHOLDERS)}")


def teacher_messages(example: PromptExample, pi: PIConfig) -> list[Message]:
    """The student's messages with the privileged information added."""
    messages = [dict(m) for m in example.messages]
    if pi.mode is PIMode.SYSTEM_PROMPT:
        return _with_system_rule(messages, _rule(example, pi))
    template = pi.template or DEFAULT_PI_TEMPLATES[pi.mode]
    if example.solution is None and "solution" in _fields(template):
        raise ValueError(f"example {example.index}: PI template needs a 'solution' field")
    last = messages[-1]
    last["content"] = template.format(prompt=last["content"], answer=example.answer,
                                      solution=example.solution)
    return messages


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _rule(example: PromptExample, pi: PIConfig) -> str:
    rule = example.system_prompt or pi.system_prompt
    if rule is None:
        raise ValueError(f"example {example.index}: PI mode 'system_prompt' needs a 'system_prompt' "
                         f"field or a configured system prompt")
    return rule


def _with_system_rule(messages: list[Message], rule: str) -> list[Message]:
    # A dataset's own system message is ordinary context both sides see: the rule goes in front.
    if messages[0]["role"] == "system":
        messages[0]["content"] = f"{rule}\n\n{messages[0]['content']}"
        return messages
    return [{"role": "system", "content": rule}, *messages]
