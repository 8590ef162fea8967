"""YAML recipes -> typed dataclasses, with `defaults:` inheritance and dotted CLI overrides.

    # conf/opd_tiny.yaml
    defaults: [base_tiny.yaml]        # merged first, in order; paths relative to this file
    optimizer: {lr: 2.0e-6}

    python -m opd_megatron train --config conf/opd_tiny.yaml optimizer.lr=1e-6 parallel.tensor_parallel=2

Every leaf remembers the file (or override) that set it, so a type error names both the key and
where it came from.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe problem, reported as one line naming the key and its source."""


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(base: dict, update: dict, sources: dict[str, str], source: str, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value, sources, source, dotted + ".")
        else:
            base[key] = value
            _record(value, sources, source, dotted)


def _record(value: Any, sources: dict[str, str], source: str, dotted: str) -> None:
    sources[dotted] = source
    if isinstance(value, dict):
        for key, sub in value.items():
            _record(sub, sources, source, f"{dotted}.{key}")


def load_raw(path: str | Path, sources: dict[str, str] | None = None,
             _chain: tuple[Path, ...] = ()) -> dict:
    """The merged mapping of a recipe and its `defaults:` chain (no type checking)."""
    path = Path(path).resolve()
    if path in _chain:
        raise ConfigError(f"{path}: circular defaults: {' -> '.join(map(str, _chain + (path,)))}")
    sources = {} if sources is None else sources
    data = _read_yaml(path)
    defaults = data.pop("defaults", [])
    if isinstance(defaults, str):
        defaults = [defaults]
    if not isinstance(defaults, list):
        raise ConfigError(f"{path}: defaults: expected a list of files")
    merged: dict = {}
    for parent in defaults:
        _merge(merged, load_raw(path.parent / parent, sources, _chain + (path,)), sources,
               str(path.parent / parent))
    _merge(merged, data, sources, str(path))
    return merged


def apply_overrides(raw: dict, overrides: list[str], sources: dict[str, str]) -> None:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optimizer.lr=2e-6)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        if isinstance(value, (dict, list)) and not text.lstrip().startswith(("{", "[")):
            value = text  # "a rule: with a colon" is a string, not a mapping
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
        _record(value, sources, f"override {item!r}", key)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, sources: dict[str, str]) -> Any:
    where = sources.get(key, "<default>")

    def fail(expected: str):
        raise ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            fail(" | ".join(_type_name(o) for o in options))
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, sources)
            except ConfigError as err:
                errors.append(err)
        fail(" | ".join(_type_name(o) for o in options if o is not type(None)))
    if origin is Literal:
        if value not in get_args(tp):
            fail(f"one of {', '.join(repr(a) for a in get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail(f"a mapping for section {tp.__name__}")
        return build_dataclass(tp, value, sources, key + ".")
    if origin is list:
        if not isinstance(value, list):
            fail("a list")
        (item_tp,) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", sources) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-3` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    raise ConfigError(f"{where}: {key}: unsupported field type {tp}")


def build_dataclass(cls: type[T], raw: dict, sources: dict[str, str], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            dotted = f"{prefix}{key}"
            where = sources.get(dotted, "<config>")
            close = [name for name in fields if name.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {dotted}{hint}")
    values = {name: _coerce(raw[name], hints[name], f"{prefix}{name}", sources)
              for name in fields if name in raw}
    return cls(**values)


def load_config(path: str | Path, schema: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    sources: dict[str, str] = {}
    raw = load_raw(path, sources)
    apply_overrides(raw, list(overrides), sources)
    return build_dataclass(schema, raw, sources)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
