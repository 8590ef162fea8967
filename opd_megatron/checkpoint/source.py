"""Resolve the `model:` section of a recipe to an architecture."""
from __future__ import annotations

from opd_megatron.config.loader import ConfigError
from opd_megatron.config.schema import ModelConfig
from opd_megatron.models.arch import ArchitectureError, ModelArch
from opd_megatron.checkpoint.megatron_dist import CheckpointError, read_arch


def resolve_arch(model: ModelConfig, section: str = "model") -> ModelArch:
    given = [k for k in ("megatron_dir", "hf_dir", "hf_config") if getattr(model, k) is not None]
    if len(given) != 1:
        raise ConfigError(f"{section}: set exactly one of megatron_dir, hf_dir, hf_config "
                          f"(got {', '.join(given) or 'none'})")
    try:
        if model.megatron_dir is not None:
            return read_arch(model.megatron_dir)
        if model.hf_dir is not None:
            return ModelArch.from_hf_dir(model.hf_dir)
        return ModelArch.from_hf_dict(model.hf_config, source=f"{section}.hf_config")
    except (ArchitectureError, CheckpointError) as err:
        raise ConfigError(f"{section}: {err}") from None
