"""The one shape contract of every micro-batch the model sees (training stages, teacher scoring
and the native rollout engine's forwards).

What Transformer Engine and megatron-core assert about a [b, s] micro-batch:
- FP8 GEMMs need the product of all input dims but the last to be a multiple of 8 (and the last
  a multiple of 16); sequences are padded to 16, so every b x s qualifies. Under sequence
  parallelism each rank's shard of s/TP is what is cast to FP8, so the shard carries the 16.
- Sequence parallelism scatters the sequence over the TP ranks: s must divide by TP.
- Context parallelism splits every sequence into 2 x CP chunks (load balancing): s must divide
  by 2 x CP. No batch is split per CP rank yet, so CP > 1 is refused up front.
- A native-engine decode step is one token per row, so under FP8 the rows carry the multiple.

Padding is masked (loss mask 0) and never trained on; right padding leaves causal attention of
the real tokens unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from opd_megatron.config.loader import ConfigError
from opd_megatron.config.schema import ParallelConfig, PrecisionConfig

FP8_MULTIPLE = 16


@dataclass(frozen=True)
class ShapeContract:
    sequence_multiple: int = 1   # every micro-batch's sequence length divides by this
    row_multiple: int = 1        # rows of a native-engine forward divide by this

    @classmethod
    def for_run(cls, precision: PrecisionConfig, parallel: ParallelConfig) -> "ShapeContract":
        fp8 = precision.precision == "fp8"
        tp = parallel.tensor_parallel if parallel.sequence_parallel else 1
        cp = parallel.context_parallel
        multiple = math.lcm(FP8_MULTIPLE * tp if fp8 else tp, 2 * cp if cp > 1 else 1)
        return cls(sequence_multiple=multiple, row_multiple=FP8_MULTIPLE if fp8 else 1)

    def sequence_length(self, longest: int) -> int:
        """The padded length of a micro-batch whose longest sequence has `longest` tokens."""
        return -(-longest // self.sequence_multiple) * self.sequence_multiple


def check_context_parallel(parallel: ParallelConfig, where: str) -> None:
    """Refuse CP > 1 before any process group starts: megatron accepts it on GPU, but without
    per-rank sequence splits every CP rank would attend over the whole sequence (wrong)."""
    if parallel.context_parallel > 1:
        raise ConfigError(f"{where}: parallel.context_parallel={parallel.context_parallel} is not "
                          "supported yet (batches are not split per context-parallel rank); use 1")
