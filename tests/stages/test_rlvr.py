"""GRPO raises the mean reward of an SFT'd tiny model with PPO mini-batches; π_old is the engine's
log-probs and the clip acts only off-policy; reward and data failures are reported."""
import json
import re
import subprocess
import sys

from opd_megatron.data.synthetic import addition_problems, prompt_rows, write_jsonl
from opd_megatron.stages.timing import PHASES
from opd_megatron.trainer.metrics import read_metrics
from tests.launch import REPO_ROOT
from tests.stages.conftest import stage_overrides, train


def rlvr_args(tiny_world, sft_run, out, train_path, **extra):
    root, data = tiny_world
    values = {"model.megatron_dir": str(sft_run[0] / "checkpoints" / "latest"),
              "data.train_path": str(train_path), "data.eval_path": str(train_path), **extra}
    return ["--config", "conf/rlvr_tiny_cpu_tp1.yaml", *stage_overrides(root, data, out, **values)]


def test_grpo_raises_mean_reward(tiny_world, sft_run, tmp_path):
    """Eight fixed prompts, 8 samples each: the SFT'd policy gets some right at T=1, and GRPO
    (two PPO updates per batch, the recipe's) makes it get more right (mean reward of the last
    8 steps vs the first 8). Every step logs the engine/trainer comparison and its timings."""
    prompts = write_jsonl(prompt_rows(addition_problems(100, digits=1, seed=0)[:8]),
                          tmp_path / "train8.jsonl")
    out = tmp_path / "rlvr"
    train(1, *rlvr_args(tiny_world, sft_run, out, prompts, **{
        "trainer.steps": 30, "trainer.global_batch_size": 8, "optimizer.lr": 3e-4,
        "optimizer.warmup_steps": 3}))
    history = read_metrics(out / "metrics.jsonl")
    rewards = [h["reward"] for h in history]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert 0 < first < 0.5
    assert last > first + 0.05, rewards
    for h in history:
        for key in ("clip_fraction", "ratio_mean", "ratio_max", "approx_kl", "gen_kl_error",
                    "rollout/logprob_diff_mean", "tokens_per_second", "reward/errors",
                    *(f"time/{phase}" for phase in PHASES)):
            assert key in h, key
        # fp32 native engine: the trainer computes the very log-probs the engine sampled with.
        assert h["rollout/logprob_diff_max"] < 1e-5
        assert min(h["time/generate"], h["time/reward"], h["time/train"]) > 0
    assert history[-1]["time/checkpoint"] > 0


def ppo_args(tiny_world, out, **extra):
    """One GRPO step on the random tiny student; overlong shaping spreads its (all-zero) task
    rewards over response lengths, so groups have advantages."""
    root, data = tiny_world
    values = {"model.megatron_dir": str(root / "student"), "data.train_path": str(data["train"]),
              "data.eval_path": "null", "trainer.steps": 1, "trainer.global_batch_size": 4,
              "optimizer.lr": 1e-2, "optimizer.warmup_steps": 0, "grpo.overlong_buffer": 20,
              **extra}
    return ["--config", "conf/rlvr_tiny_cpu_tp1.yaml", *stage_overrides(root, data, out, **values)]


def test_pi_old_is_the_engine_and_the_clip_acts_from_the_second_update(tiny_world, tmp_path):
    """One update per batch: π_old is the engine's log-probs, which the trainer reproduces, so
    the ratio is 1 and nothing is clipped. Two mini-batches at a large learning rate: the second
    update is off-policy (ratio far from 1, clipped tokens). With TIS on, the weights of an fp32
    native engine are 1; dynamic sampling reports its draws."""
    rows = {}
    for name, extra in (("one", {"grpo.mini_batches": 1}),
                        ("two", {"grpo.mini_batches": 2, "rollout.tis_cap": 2.0,
                                 "grpo.dynamic_sampling": "true", "grpo.overlong_filter": "true"})):
        train(1, *ppo_args(tiny_world, tmp_path / name, **extra))
        (rows[name],) = read_metrics(tmp_path / name / "metrics.jsonl")
    one, two = rows["one"], rows["two"]
    assert one["rollout/logprob_diff_max"] < 1e-5 and two["rollout/logprob_diff_max"] < 1e-5
    assert one["clip_fraction"] == 0 and abs(one["ratio_mean"] - 1) < 1e-5
    assert one["ratio_max"] < 1 + 1e-5
    assert two["clip_fraction"] > 0 and two["ratio_max"] > 1.28 and two["approx_kl"] > 1e-4
    assert abs(two["tis/weight_mean"] - 1) < 1e-5 and two["tis/weight_max"] < 1 + 1e-5
    assert two["dynamic/draws"] >= 1 and 0 < two["dynamic/kept_fraction"] <= 1
    assert "tis/weight_mean" not in one and "dynamic/draws" not in one


def run_train(*args):
    return subprocess.run([sys.executable, "-m", "opd_megatron", "train", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


def test_reward_that_raises_names_reward_and_example(tiny_world, sft_run, tmp_path):
    _, data = tiny_world
    settings = {"trainer.steps": 1, "trainer.global_batch_size": 4, "grpo.reward": "always_raises",
                "grpo.reward_plugins": "[tests.stages.raising_reward]", "data.eval_path": "null"}
    # By default failures score 0 and the run stops once too many failed (here: all 32).
    proc = run_train(*rlvr_args(tiny_world, sft_run, tmp_path / "a", data["train"], **settings))
    assert proc.returncode == 2
    assert re.match(r"error: reward 'always_raises': 32 of 32 responses failed so far \(100.0% > "
                    r"grpo.reward_max_error_rate=0.05\); reward 'always_raises' failed on "
                    r"example index \d+: ZeroDivisionError", proc.stderr.strip().splitlines()[-1])
    proc = run_train(*rlvr_args(tiny_world, sft_run, tmp_path / "r", data["train"], **settings,
                                **{"grpo.reward_on_error": "raise"}))
    assert proc.returncode == 2
    assert re.match(r"error: reward 'always_raises' failed on example index \d+: ZeroDivisionError",
                    proc.stderr.strip().splitlines()[-1])
    proc = run_train(*rlvr_args(tiny_world, sft_run, tmp_path / "b", data["train"], **settings,
                                **{"grpo.reward_max_error_rate": 1.0}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert row["reward/errors"] == 4 * 8 and row["reward"] == 0   # 4 prompts x 8 samples


def test_malformed_row_is_reported_with_file_and_line_or_skipped(tiny_world, sft_run, tmp_path):
    rows = prompt_rows(addition_problems(100, digits=1, seed=0)[:16])
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[4] = '{"prompt": "1+1=", "answer": 2'
    path.write_text("\n".join(lines) + "\n")
    args = rlvr_args(tiny_world, sft_run, tmp_path / "a", path, **{"trainer.steps": 1,
                                                                   "data.eval_path": "null"})
    proc = run_train(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path}:5:")
    proc = run_train(*args, f"output_dir={tmp_path / 'b'}", "data.skip_bad_rows=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(tmp_path / "b" / "metrics.jsonl")[0]["skipped_rows"] == 1


def test_unknown_reward_is_a_config_error(tiny_world, sft_run, tmp_path):
    _, data = tiny_world
    proc = run_train(*rlvr_args(tiny_world, sft_run, tmp_path / "a", data["train"], **{
        "grpo.reward": "nope"}))
    assert proc.returncode == 2
    assert "grpo.reward='nope' is not a registered reward (known: exact_match, format_rule, math)" \
        in proc.stderr


def test_empty_dataset_is_a_clear_error(tiny_world, sft_run, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_train(*rlvr_args(tiny_world, sft_run, tmp_path / "a", empty, **{
        "trainer.steps": 1, "data.eval_path": "null"}))
    assert proc.returncode == 2
    assert str(empty) in proc.stderr.strip().splitlines()[-1]
