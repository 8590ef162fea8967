"""Named reward plug-ins.

A reward is `fn(response_text, example, **options) -> float`; options are keyword-only parameters
with defaults, bound by `get_reward(name, **options)` so a recipe can configure them by name.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any, Protocol

from opd_megatron.data.examples import PromptExample


class RewardFn(Protocol):
    def __call__(self, response: str, example: PromptExample) -> float: ...


_REGISTRY: dict[str, Callable[..., float]] = {}
# Imported on first lookup, so registering the built-ins costs nothing until a reward is used.
_BUILTIN_MODULES = ("math_reward", "exact_match", "format_rule")


def register_reward(name: str) -> Callable[[Callable[..., float]], Callable[..., float]]:
    def decorator(fn: Callable[..., float]) -> Callable[..., float]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn
    return decorator


def reward_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_reward(name: str, **options: Any) -> RewardFn:
    _load_builtins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward '{name}'; known rewards: {', '.join(sorted(_REGISTRY))}")
    fn = _REGISTRY[name]
    accepted = {p.name for p in inspect.signature(fn).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = set(options) - accepted
    if unknown:
        raise TypeError(f"reward '{name}' has no options {sorted(unknown)}; "
                        f"its options: {sorted(accepted) or 'none'}")
    return functools.partial(fn, **options) if options else fn


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{module}")
