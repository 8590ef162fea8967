"""Which layer implementation and numeric recipe a config asks for, decided before any model exists.

GPUs get Transformer Engine layers (and TE's FP8 recipes); CPUs get megatron-core's local layers in
fp32 or bf16 (torch's CPU bf16 kernels: bf16 parameters, fp32 main parameters in the optimizer,
gradients reduced in fp32, the same plumbing as on a GPU). FP8 needs Transformer Engine on a GPU.
The decision is a pure function of the config and the device's capabilities so that it can be
tested without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from opd_megatron.config.schema import PrecisionConfig


class PrecisionError(ValueError):
    pass


@dataclass(frozen=True)
class DeviceCaps:
    cuda: bool
    compute_capability: tuple[int, int] | None = None
    transformer_engine: bool = False

    @classmethod
    def detect(cls) -> "DeviceCaps":
        if not torch.cuda.is_available():
            return cls(cuda=False)
        try:
            import transformer_engine  # noqa: F401
            has_te = True
        except ImportError:
            has_te = False
        return cls(cuda=True, compute_capability=torch.cuda.get_device_capability(),
                   transformer_engine=has_te)


@dataclass(frozen=True)
class PrecisionPlan:
    layer_spec: Literal["transformer_engine", "local"]
    params_dtype: torch.dtype
    fp8_recipe: str | None = None   # megatron-core's TransformerConfig.fp8_recipe
    fp8_format: str | None = None   # megatron-core's TransformerConfig.fp8


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def plan_precision(cfg: PrecisionConfig, caps: DeviceCaps) -> PrecisionPlan:
    """Map `precision.*` onto a layer spec, parameter dtype and FP8 recipe for this device."""
    if not caps.cuda:
        if cfg.precision == "fp8":
            raise PrecisionError(
                "precision.precision=fp8 needs a CUDA GPU with Transformer Engine; on CPU use "
                "bf16 or fp32")
        return PrecisionPlan(layer_spec="local", params_dtype=_DTYPES[cfg.precision])
    if cfg.precision != "fp8":
        return PrecisionPlan(layer_spec="transformer_engine" if caps.transformer_engine else "local",
                             params_dtype=_DTYPES[cfg.precision])
    if not caps.transformer_engine:
        raise PrecisionError("precision.precision=fp8 needs Transformer Engine, which is not "
                             "importable; install the `gpu` extra or use the NGC image")
    major = caps.compute_capability[0] if caps.compute_capability else 0
    if major < 9 and not (major == 8 and caps.compute_capability[1] >= 9):
        raise PrecisionError(f"precision.precision=fp8 needs compute capability >= 8.9 "
                             f"(Ada/Hopper), this GPU has {caps.compute_capability}")
    if cfg.fp8_recipe == "blockwise" and major != 9:
        raise PrecisionError(f"precision.fp8_recipe=blockwise is a Hopper (sm_90) recipe, this GPU "
                             f"has compute capability {caps.compute_capability}")
    return PrecisionPlan(layer_spec="transformer_engine", params_dtype=torch.bfloat16,
                         fp8_recipe=cfg.fp8_recipe, fp8_format=cfg.fp8_format)
