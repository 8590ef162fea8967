"""Rewards scored once per data-parallel replica and broadcast to its model-parallel ranks.

Every TP/PP rank of a replica holds the same rollouts; scoring on each would multiply the
verifier cost by TP x PP and, with a nondeterministic or timing-out verifier, could even give
ranks different rewards (and different dynamic-sampling decisions). The replica's first rank
scores in its worker pool; a failure that stops the run is broadcast too, so every rank stops.
"""
from __future__ import annotations

import torch

from opd_megatron.rewards.scoring import RewardError, RewardScorer, ScoredBatch
from opd_megatron.stages.timing import phase


class ReplicaScorer:
    def __init__(self, cfg, name: str, options: dict | None = None):
        g = cfg.grpo
        self.scorer = RewardScorer(name, on_error=g.reward_on_error, options=dict(options or {}),
                                   workers=g.reward_workers if self._is_source() else 0,
                                   timeout=g.reward_timeout, plugins=tuple(g.reward_plugins),
                                   max_error_rate=g.reward_max_error_rate)

    @staticmethod
    def _group():
        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() == 1:
            return None, True
        return ps.get_model_parallel_group(), \
            torch.distributed.get_rank() == ps.get_model_parallel_src_rank()

    def _is_source(self) -> bool:
        return self._group()[1]

    def __call__(self, responses, examples) -> ScoredBatch:
        group, source = self._group()
        with phase("reward"):
            result: ScoredBatch | RewardError | None = None
            if source:
                try:
                    result = self.scorer(responses, examples)
                except RewardError as err:
                    result = err
            if group is not None:
                from megatron.core import parallel_state as ps

                box = [result]
                torch.distributed.broadcast_object_list(box, src=ps.get_model_parallel_src_rank(),
                                                        group=group)
                result = box[0]
        if isinstance(result, RewardError):
            raise RewardError(str(result))
        return result
