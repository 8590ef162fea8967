"""Training data at the CLI: a row that is not UTF-8 is a bad row (file:line; skipped and counted
under data.skip_bad_rows); a row longer than data.max_seq_length follows data.overlong_prompt in
every stage (skip, truncate_left, error), counted in the metrics."""
import json

import pytest

from opd_megatron.trainer.metrics import read_metrics
from tests.stages.conftest import sft_args, stage_overrides
from tests.user_errors import one_line_error, run_command, succeeded

LONG = "1+" * 200 + "1="


def data_file(tiny_world, tmp_path, name, extra_line: bytes):
    """The stage's training file with one extra row as line 2."""
    lines = tiny_world[1][name].read_bytes().splitlines(keepends=True)
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(lines[0] + extra_line + b"".join(lines[1:]))
    return path


def sft(tiny_world, out, train_path, **extra):
    return run_command("train", *sft_args(tiny_world, out, **{
        "data.train_path": train_path, "data.eval_path": "null", "trainer.steps": 1,
        "trainer.save_every": -1, "data.max_seq_length": 64, **extra}))


def test_not_utf8_is_a_bad_row(tiny_world, tmp_path):
    path = data_file(tiny_world, tmp_path, "sft", b'{"prompt": "1+1=", "response": "\xff2"}\n')
    message = one_line_error(sft(tiny_world, tmp_path / "a", path))
    assert message == f"{path}:2: field '<utf-8>': not UTF-8 (byte 0xff at column 33)"
    assert not (tmp_path / "a").exists()
    succeeded(sft(tiny_world, tmp_path / "b", path, **{"data.skip_bad_rows": "true"}))
    assert read_metrics(tmp_path / "b" / "metrics.jsonl")[0]["skipped_rows"] == 1


@pytest.fixture
def long_sft(tiny_world, tmp_path):
    return data_file(tiny_world, tmp_path, "sft",
                     json.dumps({"prompt": LONG, "response": "401"}).encode() + b"\n")


def test_overlong_sft_row_is_an_error_by_default(tiny_world, tmp_path, long_sft):
    message = one_line_error(sft(tiny_world, tmp_path / "a", long_sft))
    assert message.startswith(f"{long_sft}:2: prompt + response is ")
    assert message.endswith(" tokens, longer than data.max_seq_length=64 "
                            "(data.overlong_prompt=error; skip or truncate_left handle it)")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("policy,counter", [("skip", "overlong_skipped"),
                                            ("truncate_left", "overlong_truncated")])
def test_overlong_sft_row_skipped_or_truncated_and_counted(tiny_world, tmp_path, long_sft,
                                                           policy, counter):
    out = tmp_path / policy
    succeeded(sft(tiny_world, out, long_sft, **{"data.overlong_prompt": policy,
                                                 "trainer.micro_batch_size": 8}))
    row = read_metrics(out / "metrics.jsonl")[0]
    assert row[counter] == 1 and row["tokens"] > 0


def test_overlong_rl_prompt_is_an_error(tiny_world, tmp_path):
    """RLVR (like OPD/OPSD) measures the prompt against data.max_seq_length."""
    root, data = tiny_world
    path = data_file(tiny_world, tmp_path, "train",
                     json.dumps({"prompt": LONG, "answer": "201"}).encode() + b"\n")
    message = one_line_error(run_command(
        "train", "--config", "conf/rlvr_tiny_cpu_tp1.yaml",
        *stage_overrides(root, data, tmp_path / "a", **{
            "data.train_path": path, "data.eval_path": "null", "data.max_seq_length": 128})))
    assert message.startswith(f"{path}:2: prompt is ")
    assert message.endswith(" tokens, longer than data.max_seq_length=128 "
                            "(data.overlong_prompt=error; skip or truncate_left handle it)")
