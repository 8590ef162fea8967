"""What every stage shares: its training dataset and resumable sampler, the evaluator, and the
reduction of a step's micro-batch outputs into logged metrics."""
from __future__ import annotations

from typing import Callable

from opd_megatron.data.dataset import load_prompt_dataset
from opd_megatron.data.encoding import encode_prompt
from opd_megatron.data.overlong import screen_overlong
from opd_megatron.data.sampler import BatchSampler
from opd_megatron.stages.evaluate import Evaluator
from opd_megatron.stages.loop import is_metrics_reporter


class StageBase:
    load_dataset: Callable = staticmethod(load_prompt_dataset)
    # What data.max_seq_length bounds: the prompt (RL stages) or the whole sequence (SFT).
    measured = "prompt"

    def __init__(self, ctx):
        self.ctx = ctx
        cfg = ctx.cfg
        screened = screen_overlong(
            self.load_dataset(cfg.data.train_path, skip_bad_rows=cfg.data.skip_bad_rows),
            self.sequence_length, cfg.data.max_seq_length, cfg.data.overlong_prompt,
            what=self.measured)
        self.dataset = screened.dataset
        self.overlong = {"overlong_skipped": float(screened.skipped),
                         "overlong_truncated": float(screened.truncated)}
        self.sampler = BatchSampler(len(self.dataset), ctx.per_rank_batch, seed=cfg.seed,
                                    dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
        self.evaluator = Evaluator(ctx)

    def sequence_length(self, example) -> int:
        return len(encode_prompt(self.ctx.tokenizer, example))

    def next_examples(self) -> list:
        return [self.dataset[i] for i in self.sampler.next_batch()]

    def step_metrics(self, outputs: list[dict], info: dict, *,
                     averaged: tuple[str, ...] = (), maxed: tuple[str, ...] = ()) -> dict:
        """The step's optimizer numbers, plus (on the reporting rank) the token-mean loss from
        the micro-batches' `loss_sum`/`tokens`, the micro-batch mean of each key in `averaged`,
        the largest value of each key in `maxed`, the count of skipped malformed rows and of
        over-long examples skipped or truncated."""
        metrics = {"lr": info["lr"], "grad_norm": info["grad_norm"],
                   "skipped_nonfinite": float(info["skipped_nonfinite"])}
        if outputs and is_metrics_reporter():
            tokens = sum(float(o["tokens"]) for o in outputs)
            metrics["loss"] = sum(float(o["loss_sum"]) for o in outputs) / max(tokens, 1.0)
            metrics["tokens"] = tokens
            metrics["skipped_rows"] = float(self.dataset.num_skipped)
            metrics.update(self.overlong)
            for key in averaged:
                if key in outputs[0]:
                    metrics[key] = sum(float(o[key]) for o in outputs) / len(outputs)
            for key in maxed:
                if key in outputs[0]:
                    metrics[key] = max(float(o[key]) for o in outputs)
        return metrics

    def evaluate(self) -> dict[str, float]:
        return self.evaluator.run()

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
