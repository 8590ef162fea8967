"""What a stage is handed: config, model, tokenizer, data-parallel coordinates, rollout engine."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from opd_megatron.data.shapes import ShapeContract
from opd_megatron.models.arch import ModelArch
from opd_megatron.rollout.base import SamplingParams
from opd_megatron.stages.config import StageConfig
from opd_megatron.trainer.engine import TrainableModel


def stage_tokenizer(cfg: StageConfig) -> tuple[object, str]:
    """The run's one tokenizer (student and teacher share it) and the directory it came from."""
    from opd_megatron.data.tokenizer import load_tokenizer

    directory = str(cfg.data.tokenizer or cfg.model.megatron_dir or cfg.model.hf_dir)
    return load_tokenizer(directory, cfg.data.chat_template_kwargs), directory


@dataclass
class StageContext:
    cfg: StageConfig
    arch: ModelArch
    model: TrainableModel
    tokenizer: object            # opd_megatron.data.tokenizer.Tokenizer
    tokenizer_dir: str
    dp_rank: int
    dp_size: int

    @property
    def per_rank_batch(self) -> int:
        """Sequences (SFT) or prompts (RL stages) this DP rank handles per optimizer step."""
        return self.cfg.trainer.global_batch_size // self.dp_size

    @cached_property
    def shapes(self) -> ShapeContract:
        """What every micro-batch of this run is padded to (FP8, sequence/context parallelism)."""
        return ShapeContract.for_run(self.cfg.precision, self.cfg.parallel)

    @cached_property
    def engine(self):
        """The rollout engine over the live student weights."""
        if self.cfg.rollout.engine == "vllm":
            from opd_megatron.rollout.vllm_engine import VLLMRolloutEngine

            return VLLMRolloutEngine.from_config(self.cfg, self.arch, self.tokenizer_dir,
                                                 chunks=self.model.chunks)
        from opd_megatron.rollout.native import NativeRolloutEngine

        return NativeRolloutEngine(self.model.chunks, self.arch,
                                   eos_token_ids=[self.tokenizer.eos_token_id],
                                   pad_token_id=self.tokenizer.pad_token_id,
                                   row_multiple=self.shapes.row_multiple)

    def frozen_student_copy(self) -> list:
        """Forward-only chunks holding the student's current weights (a reference model, or
        OPSD's frozen initial teacher)."""
        from opd_megatron.trainer.engine import build_frozen

        cfg = self.cfg
        chunks = build_frozen(self.arch, cfg.parallel, cfg.precision,
                              cfg.model.make_vocab_size_divisible_by)
        for frozen, live in zip(chunks, self.model.chunks):
            frozen.load_state_dict(live.module.state_dict())
        return chunks

    def training_sampling(self, step: int, draw: int = 0) -> SamplingParams:
        """Sampling for `step`'s rollouts; `draw` numbers further draws within one step."""
        r = self.cfg.rollout
        return SamplingParams(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              max_new_tokens=r.max_new_tokens, n=r.samples_per_prompt,
                              seed=(self.cfg.seed * 100003 + step * 1009 + self.dp_rank
                                    + draw * 7919),
                              return_top_k=r.return_top_k)

    def eval_sampling(self) -> SamplingParams:
        """Evaluation scores decoded text only: it is not held to the rollout log-prob
        contract, so it may sample at its own temperature on an engine set up for training."""
        e = self.cfg.eval
        return SamplingParams(temperature=e.temperature, max_new_tokens=e.max_new_tokens,
                              n=e.samples_per_prompt, seed=self.cfg.seed + 7, logprobs=False)
