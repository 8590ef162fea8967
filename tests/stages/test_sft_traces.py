"""tools/make_sft_traces.py: SFT rows sampled from a teacher, filtered by a reward, in the format
the SFT stage reads; bad flags are one line and write nothing."""
import json

from opd_megatron.data.dataset import load_prompt_dataset, load_sft_dataset
from opd_megatron.rewards.scoring import RewardScorer
from tests.user_errors import one_line_error, run_command, succeeded

TOOL = "tools/make_sft_traces.py"


def test_traces_from_a_teacher_are_sft_rows_that_pass_the_reward(tiny_world, sft_run, tmp_path):
    _, data = tiny_world
    teacher = str(sft_run[0] / "checkpoints" / "latest")
    out = tmp_path / "traces.jsonl"
    proc = succeeded(run_command("--megatron-dir", teacher, "--prompts", str(data["eval"]),
                                 "--out", str(out), "--reward", "exact_match",
                                 "--samples-per-prompt", "2", "--temperature", "0.5",
                                 "--max-new-tokens", "40", script=TOOL))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    prompts = load_prompt_dataset(data["eval"])
    assert summary["prompts"] == len(prompts) and summary["responses"] == 2 * len(prompts)
    traces = load_sft_dataset(out)
    assert len(traces) == summary["kept"] > 0
    # Every kept trace answers its own prompt correctly.
    by_prompt = {json.dumps(ex.messages): ex for ex in prompts}
    examples = [by_prompt[json.dumps(t.messages)] for t in traces]
    assert RewardScorer("exact_match")([t.response for t in traces], examples).scores == \
        [1.0] * len(traces)


def test_bad_flags_write_nothing(tiny_world, tmp_path):
    root, data = tiny_world
    out = tmp_path / "traces.jsonl"
    message = one_line_error(run_command("--megatron-dir", str(root / "student"), "--prompts",
                                         str(data["eval"]), "--out", str(out), "--reward", "nope",
                                         script=TOOL))
    assert message.startswith("--reward 'nope' is not a registered reward")
    message = one_line_error(run_command("--megatron-dir", str(root / "student"), "--prompts",
                                         str(data["eval"]), "--out", str(tmp_path / "t.csv"),
                                         script=TOOL))
    assert message == f"--out {tmp_path}/t.csv: SFT traces are written as .jsonl"
    assert list(tmp_path.iterdir()) == []
