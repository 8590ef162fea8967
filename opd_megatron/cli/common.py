"""Shared start-up of every command: load the recipe and validate it before any process group."""
from __future__ import annotations

import torch

from opd_megatron.checkpoint.source import resolve_arch
from opd_megatron.config.loader import load_config
from opd_megatron.config.validate import validate_layout, validate_optimizer
from opd_megatron.models.arch import ModelArch
from opd_megatron.runtime.distributed import world_size_from_env


def add_recipe_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe in conf/")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=2e-6")


def load_and_validate(path: str, overrides: list[str], schema):
    """(config, student architecture), or ConfigError naming the key and the file."""
    cfg = load_config(path, schema, overrides)
    arch: ModelArch = resolve_arch(cfg.model)
    validate_layout(cfg.parallel, arch, world_size_from_env(), cuda=torch.cuda.is_available(),
                    where=str(path))
    validate_optimizer(cfg.optimizer, where=str(path),
                       distributed_optimizer=cfg.parallel.distributed_optimizer)
    from opd_megatron.models.precision import DeviceCaps, PrecisionError, plan_precision
    from opd_megatron.config.loader import ConfigError

    try:
        plan_precision(cfg.precision, DeviceCaps.detect())
    except PrecisionError as err:
        raise ConfigError(f"{path}: {err}") from None
    return cfg, arch
