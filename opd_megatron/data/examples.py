"""Typed rows of the prompt and SFT datasets, and the validation that turns a raw dict into one.

Validation errors are `RowError`s that name only the field; the dataset loader adds the file and line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")

# Chat messages stay plain dicts: HF chat templates consume exactly this shape.
Message = dict[str, str]


class RowError(ValueError):
    """A row that does not match the schema; `field` is the offending field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")
        self.field = field


@dataclass(frozen=True)
class PromptExample:
    """One prompt for rollouts. `system_prompt` is privileged information (OPSD `system_prompt`
    mode): it never enters the student prompt, only the teacher prompt."""

    messages: list[Message]
    answer: str
    solution: str | None = None
    system_prompt: str | None = None
    index: int = 0


@dataclass(frozen=True)
class SFTExample:
    """A prompt (chat messages ending with a user turn) and the assistant response to train on."""

    messages: list[Message]
    response: str
    index: int = 0


def parse_prompt_row(row: dict[str, Any], index: int) -> PromptExample:
    messages = _prompt_messages(row)
    if messages[-1]["role"] != "user":
        raise RowError("messages", "last turn must be 'user'")
    return PromptExample(
        messages=messages,
        answer=_string(row, "answer", required=True),
        solution=_string(row, "solution", required=False),
        system_prompt=_string(row, "system_prompt", required=False),
        index=index,
    )


def parse_sft_row(row: dict[str, Any], index: int) -> SFTExample:
    if _present(row, "response"):
        messages, response = _prompt_messages(row), _string(row, "response", required=True)
    else:
        messages = _prompt_messages(row)
        if messages[-1]["role"] != "assistant":
            raise RowError("response", "missing (and the last message is not 'assistant')")
        messages, response = messages[:-1], messages[-1]["content"]
    if not messages or messages[-1]["role"] != "user":
        raise RowError("messages", "the turn before the response must be 'user'")
    return SFTExample(messages=messages, response=response, index=index)


def _prompt_messages(row: dict[str, Any]) -> list[Message]:
    if _present(row, "messages"):
        return _messages(row["messages"])
    if _present(row, "prompt"):
        return [{"role": "user", "content": _string(row, "prompt", required=True)}]
    raise RowError("prompt", "missing (need 'prompt' or 'messages')")


def _messages(value: Any) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise RowError("messages", "must be a non-empty list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"messages[{i}]", "must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"messages[{i}].role", f"must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise RowError(f"messages[{i}].content", f"must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


def _present(row: dict[str, Any], field: str) -> bool:
    # Parquet has no "absent": a column missing from a row reads back as None.
    return row.get(field) is not None


def _string(row: dict[str, Any], field: str, *, required: bool) -> str | None:
    if not _present(row, field):
        if required:
            raise RowError(field, "missing required field")
        return None
    value = row[field]
    if not isinstance(value, str):
        raise RowError(field, f"must be a string, got {type(value).__name__}")
    return value
