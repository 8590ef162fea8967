"""Accuracy of the live student on held-out prompts (no privileged information), under the
configured reward: pass@1 at temperature 0, avg@k when sampling k per prompt."""
from __future__ import annotations

import torch

from opd_megatron.data.dataset import load_prompt_dataset
from opd_megatron.data.encoding import encode_prompt
from opd_megatron.data.overlong import keep_last, screen_overlong
from opd_megatron.runtime.distributed import current_device
from opd_megatron.stages.replica_rewards import ReplicaScorer


class Evaluator:
    def __init__(self, ctx):
        self.ctx = ctx
        cfg = ctx.cfg
        self.dataset = None
        if cfg.data.eval_path:
            self.dataset = screen_overlong(
                load_prompt_dataset(cfg.data.eval_path, skip_bad_rows=cfg.data.skip_bad_rows),
                lambda ex: len(self._encode(ex)), cfg.data.max_seq_length, cfg.data.overlong_prompt,
                what="prompt").dataset
        self.scorer = ReplicaScorer(cfg, cfg.eval.reward, cfg.eval.reward_options)

    def _encode(self, example) -> list[int]:
        return encode_prompt(self.ctx.tokenizer, example)

    def run(self) -> dict[str, float]:
        if self.dataset is None:
            return {}
        ctx, e = self.ctx, self.ctx.cfg.eval
        count = min(e.num_examples, len(self.dataset))
        mine = [self.dataset[i] for i in range(ctx.dp_rank, count, ctx.dp_size)]
        sampling = ctx.eval_sampling()
        for chunk in ctx.model.chunks:
            chunk.eval()
        limit = ctx.cfg.data.max_seq_length
        rollouts = ctx.engine.generate([keep_last(self._encode(ex), limit) for ex in mine], sampling)
        texts = [ctx.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
        examples = [mine[r.prompt_index] for r in rollouts]
        scores = self.scorer(texts, examples).scores if rollouts else []
        totals = torch.tensor([float(sum(scores)), float(len(scores)),
                               float(sum(len(r.response_ids) for r in rollouts))],
                              dtype=torch.float64, device=current_device())
        torch.distributed.all_reduce(totals)
        # Every rank of a model-parallel group saw the same rollouts; count each replica once.
        from megatron.core import parallel_state as ps

        totals /= (ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size()
                   * ps.get_context_parallel_world_size())
        n = max(totals[1].item(), 1.0)
        return {"accuracy": totals[0].item() / n, "response_length": totals[2].item() / n}
