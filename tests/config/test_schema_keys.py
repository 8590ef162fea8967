"""Every key of every recipe schema is read by some code: a key nothing reads is a setting that
silently does nothing (as `precision.fp8_first_last_layers_bf16` once did)."""
import ast
import dataclasses
from pathlib import Path

import pytest

from opd_megatron.cli.smoke import SmokeConfig
from opd_megatron.stages.config import StageConfig

PACKAGE = Path(__file__).resolve().parents[2] / "opd_megatron"


def schema_keys(schema, prefix=""):
    for f in dataclasses.fields(schema):
        # Sections are dataclass defaults (field types are strings under postponed annotations).
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from schema_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def attributes_read() -> set[str]:
    """Names read as `x.name` anywhere in the package (dataclass field definitions are not
    attribute reads, and the loader's generic getattr does not name a field)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
    return names


@pytest.mark.parametrize("schema", [StageConfig, SmokeConfig], ids=lambda s: s.__name__)
def test_every_schema_key_is_read(schema):
    read = attributes_read()
    unread = [key for key in schema_keys(schema) if key.rsplit(".", 1)[-1] not in read]
    assert not unread, f"schema keys no code reads: {unread}"


def test_the_walk_sees_nested_keys():
    keys = set(schema_keys(StageConfig))
    assert {"precision.fp8_first_last_layers_bf16", "teacher.pi.mode", "trainer.recompute",
            "data.chat_template_kwargs", "stage"} <= keys
