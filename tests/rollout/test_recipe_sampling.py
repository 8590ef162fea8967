"""Every recipe's training rollout *and* evaluation sampling through the vLLM engine's log-prob
contract (over a stand-in vllm.LLM), and the engine's memory hand-over around a training step."""
import math
from pathlib import Path

import pytest
import torch

from opd_megatron.config.loader import load_config
from opd_megatron.rollout import vllm_engine as ve
from opd_megatron.rollout.base import SamplingParams
from opd_megatron.stages.config import StageConfig
from opd_megatron.stages.context import StageContext
from tests.config.test_recipes import QWEN3_1P7B
from tests.rollout.test_vllm_contract import FakeLLM

CONF = Path(__file__).resolve().parents[2] / "conf"
STAGE_RECIPES = sorted(p for p in CONF.glob("*.yaml") if not p.name.startswith("smoke"))


@pytest.fixture
def engine_for(monkeypatch):
    monkeypatch.setattr(ve, "refit", lambda *args, **kwargs: "stats")

    def make(cfg: StageConfig) -> tuple[ve.VLLMRolloutEngine, FakeLLM]:
        llm = FakeLLM()
        engine = ve.VLLMRolloutEngine(ve.engine_config(cfg, QWEN3_1P7B), QWEN3_1P7B,
                                      chunks=["student"], llm=llm, sampling_params=dict,
                                      layout=ve.ReplicaLayout())
        return engine, llm
    return make


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda p: p.name)
def test_recipe_rollout_and_evaluation_sampling_pass_the_engine_contract(recipe, engine_for):
    cfg = load_config(recipe, StageConfig)
    ctx = StageContext(cfg=cfg, arch=QWEN3_1P7B, model=None, tokenizer=None, tokenizer_dir="",
                       dp_rank=0, dp_size=1)
    engine, _ = engine_for(cfg)
    trained = engine.generate([[1, 2, 3]], ctx.training_sampling(step=0))
    assert trained[0].logprobs == [-0.5]            # the contract's log-probs, as reported
    evaluated = engine.generate([[1, 2, 3]], ctx.eval_sampling())
    # Evaluation reads text only; its log-probs are not the contract's and say so.
    assert all(math.isnan(lp) for r in evaluated for lp in r.logprobs)


def test_training_sampling_outside_the_engine_mode_is_still_refused(engine_for):
    cfg = load_config(CONF / "opd_qwen3_1p7b_from_qwen3_1p7b_grpo_tp1_dp8.yaml", StageConfig)
    engine, _ = engine_for(cfg)
    tempered = SamplingParams(temperature=0.6, top_p=0.95)   # log-probs read, T=0.6
    with pytest.raises(ValueError, match="raw_logprobs"):
        engine.generate([[1]], tempered)


def test_cuda_cache_is_emptied_before_vllm_wakes(engine_for, monkeypatch):
    cfg = load_config(CONF / "opd_qwen3_1p7b_from_qwen3_1p7b_grpo_tp1_dp8.yaml", StageConfig)
    engine, llm = engine_for(cfg)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: llm.calls.append(("empty_cache",)))
    engine.generate([[1]], SamplingParams(top_p=0.95))
    wakes = [i for i, call in enumerate(llm.calls) if call[0] == "wake_up"]
    assert len(wakes) == 2                            # weights for the refit, then the KV cache
    assert all(llm.calls[i - 1] == ("empty_cache",) for i in wakes)
