"""Recipes: inheritance, overrides, and one-line errors that name the key and the file."""
from dataclasses import dataclass, field

import pytest

from opd_megatron.config.loader import ConfigError, load_config
from opd_megatron.config.schema import ParallelConfig, RunConfig


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_chain_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "parallel: {tensor_parallel: 2}\noptimizer: {lr: 1.0e-5, clip_grad: 0.5}\n")
    child = write(tmp_path, "child.yaml", "defaults: [base.yaml]\noptimizer: {lr: 2.0e-6}\n")
    cfg = load_config(child, RunConfig, ["parallel.pipeline_parallel=2", "precision.precision=bf16"])
    assert cfg.parallel == ParallelConfig(tensor_parallel=2, pipeline_parallel=2)
    assert cfg.optimizer.lr == 2e-6 and cfg.optimizer.clip_grad == 0.5
    assert cfg.precision.precision == "bf16"


def test_exponent_without_dot_is_a_float(tmp_path):
    cfg = load_config(write(tmp_path, "a.yaml", "optimizer: {lr: 3e-3}\n"), RunConfig, ["optimizer.min_lr=1e-5"])
    assert cfg.optimizer.lr == 3e-3 and cfg.optimizer.min_lr == 1e-5


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "a.yaml", "optimizer: {lr: 1}\n"), RunConfig)
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "a.yaml", "optimizer: {learning_rate: 1.0e-5}\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: unknown key optimizer\.learning_rate"):
        load_config(path, RunConfig)


def test_unknown_key_from_parent_names_parent_file(tmp_path):
    write(tmp_path, "base.yaml", "paralel: {tensor_parallel: 2}\n")
    child = write(tmp_path, "child.yaml", "defaults: [base.yaml]\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key paralel"):
        load_config(child, RunConfig)


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "a.yaml", "parallel: {tensor_parallel: two}\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: parallel\.tensor_parallel: expected an integer, got 'two'"):
        load_config(path, RunConfig)


def test_wrong_literal(tmp_path):
    path = write(tmp_path, "a.yaml", "precision: {precision: fp4}\n")
    with pytest.raises(ConfigError, match=r"precision\.precision: expected one of 'fp32', 'bf16', 'fp8'"):
        load_config(path, RunConfig)


def test_wrong_type_from_override_names_override(tmp_path):
    path = write(tmp_path, "a.yaml", "{}\n")
    with pytest.raises(ConfigError, match=r"override 'optimizer\.lr=fast': optimizer\.lr: expected a number"):
        load_config(path, RunConfig, ["optimizer.lr=fast"])


def test_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(write(tmp_path, "a.yaml", "{}\n"), RunConfig, ["optimizer.lr"])


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "a.yaml", "parallel:\n  tensor_parallel: [1\n")
    with pytest.raises(ConfigError, match=r"a\.yaml:\d+: invalid YAML"):
        load_config(path, RunConfig)


def test_missing_file_and_missing_parent(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", RunConfig)
    child = write(tmp_path, "child.yaml", "defaults: [missing.yaml]\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(child, RunConfig)


def test_circular_defaults(tmp_path):
    write(tmp_path, "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path, "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="circular defaults"):
        load_config(tmp_path / "a.yaml", RunConfig)


def test_subclassed_schema_with_own_section(tmp_path):
    @dataclass
    class Extra:
        steps: int = 1

    @dataclass
    class StageConfig(RunConfig):
        extra: Extra = field(default_factory=Extra)

    cfg = load_config(write(tmp_path, "a.yaml", "extra: {steps: 7}\n"), StageConfig)
    assert cfg.extra.steps == 7 and cfg.parallel.tensor_parallel == 1


def test_override_string_with_colon_stays_a_string(tmp_path):
    @dataclass
    class Section:
        text: str = ""

    @dataclass
    class Schema:
        section: Section = field(default_factory=Section)

    cfg = load_config(write(tmp_path, "a.yaml", "{}\n"), Schema, ["section.text=End with ANSWER: <n>"])
    assert cfg.section.text == "End with ANSWER: <n>"
