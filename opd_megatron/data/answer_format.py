"""The two final-answer formats of the synthetic tasks, each written and read back in one place.

`\\boxed{...}` is the default (math-verify reads it too); the `ANSWER: <n>` line is the shared
system-prompt rule a self-distilled student has to internalize.
"""
from __future__ import annotations

import re

RULE_SYSTEM_PROMPT = "Always end your reply with a line of the form ANSWER: <number>"
_RULE_LINE = re.compile(r"ANSWER: (-?\d+)")
_BOXED = "\\boxed{"


def format_boxed(answer: str) -> str:
    return f"{_BOXED}{answer}}}"


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces matched (so `\\boxed{\\frac{1}{2}}` works)."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    for pos in range(start + len(_BOXED), len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[start + len(_BOXED):pos]
    return None


def format_rule_answer(answer: str) -> str:
    return f"ANSWER: {answer}"


def extract_rule_answer(text: str) -> str | None:
    """The number on the reply's last non-empty line if that line follows the rule, else None
    (so None also means "does not comply")."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    match = _RULE_LINE.fullmatch(lines[-1]) if lines else None
    return match.group(1) if match else None
