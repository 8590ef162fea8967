"""GRPO raises the mean reward of an SFT'd tiny model; reward and data failures are reported."""
import json
import re
import subprocess
import sys

from opd_megatron.data.synthetic import addition_problems, prompt_rows, write_jsonl
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
    makes it get more right (mean reward of the last 8 steps vs the first 8)."""
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
    assert all(h["clip_fraction"] == 0 and abs(h["ratio_mean"] - 1) < 1e-5 for h in history)


def run_train(*args):
    return subprocess.run([sys.executable, "-m", "opd_megatron", "train", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)


def test_reward_that_raises_names_reward_and_example(tiny_world, sft_run, tmp_path):
    _, data = tiny_world
    settings = {"trainer.steps": 1, "trainer.global_batch_size": 4, "grpo.reward": "always_raises",
                "grpo.reward_plugins": "[tests.stages.raising_reward]", "data.eval_path": "null"}
    proc = run_train(*rlvr_args(tiny_world, sft_run, tmp_path / "a", data["train"], **settings))
    assert proc.returncode == 2
    assert re.match(r"error: reward 'always_raises' failed on example index \d+: ZeroDivisionError",
                    proc.stderr.strip().splitlines()[-1])
    proc = run_train(*rlvr_args(tiny_world, sft_run, tmp_path / "b", data["train"], **settings,
                                **{"grpo.reward_on_error": "zero"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert row["reward_errors"] == 4 * 8 and row["reward"] == 0   # 4 prompts x 8 samples


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
