"""OPD end to end with `rollout.engine: vllm` (vLLM's CPU build): the training rollouts and the
evaluation go through the colocated vLLM engine, refit from the student every step; every step
logs the engine's distance from the student, from the training forward (`gen_kl_error`) and from
the eval-mode refit check (`rollout.verify_every: 1`, `refit/gen_kl_error`)."""
from opd_megatron.trainer.metrics import read_metrics
from tests.stages.conftest import TINY, make_checkpoint, train
from tests.stages.test_distill import opd_args

# vLLM's CPU attention takes head sizes that are multiples of 32.
VLLM_TINY = {**TINY, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}
STEPS = 3


def test_opd_with_vllm_logs_gen_kl_error_below_1e_4_every_step(tiny_world, tmp_path):
    student = make_checkpoint(tmp_path / "student", VLLM_TINY, seed=1)
    teacher = make_checkpoint(tmp_path / "teacher", VLLM_TINY, seed=2)
    out = tmp_path / "opd"
    train(1, *opd_args(tiny_world, out, student, teacher, **{
        "rollout.engine": "vllm", "rollout.verify_every": 1, "trainer.steps": STEPS,
        "trainer.eval_every": STEPS,
        "eval.num_examples": 8, "rollout.max_new_tokens": 12, "eval.max_new_tokens": 12}))
    history = read_metrics(out / "metrics.jsonl")
    steps = [h for h in history if "loss" in h]
    assert len(steps) == STEPS
    for h in steps:
        assert h["refit/gen_tokens"] > 0
        assert h["gen_kl_error"] < 1e-4 and h["refit/gen_kl_error"] < 1e-4, h
    assert "eval/accuracy" in history[-1]
