"""score / generate / eval: a bad flag or input file is one line naming it, exit code 2, before
any model is loaded; nothing is written."""
import pytest

from tests.user_errors import one_line_error, run_command


@pytest.fixture(scope="module")
def ckpt(tiny_world):
    return str(tiny_world[0] / "student")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "eval.csv").write_text("prompt,answer\n1+1=,2\n")
    (root / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": "1"}\n')
    return root


def test_score_needs_two_ids(ckpt):
    message = one_line_error(run_command("score", "--megatron-dir", ckpt, "--input-ids", "5"))
    assert message.startswith("--input-ids needs at least two ids, each in [0, ")


@pytest.mark.parametrize("flag,value,rule", [
    ("--max-new-tokens", "0", ">= 1"),
    ("--temperature", "-1", ">= 0 (0 is greedy)"),
    ("--top-p", "0", "in (0, 1]"),
    ("--samples-per-prompt", "0", ">= 1"),
])
def test_generate_sampling_flags(ckpt, flag, value, rule):
    message = one_line_error(run_command("generate", "--megatron-dir", ckpt, "--prompt", "1+1=",
                                         flag, value))
    shown = value if flag in ("--max-new-tokens", "--samples-per-prompt") else float(value)
    assert message == f"{flag}={shown} must be {rule}"


def test_eval_unknown_reward(ckpt, tiny_world):
    message = one_line_error(run_command("eval", "--megatron-dir", ckpt, "--data",
                                         str(tiny_world[1]["eval"]), "--reward", "nope"))
    assert message.startswith("--reward 'nope' is not a registered reward (known: ")
    assert "exact_match" in message


def test_eval_missing_checkpoint(tiny_world, tmp_path):
    missing = tmp_path / "nowhere"
    message = one_line_error(run_command("eval", "--megatron-dir", str(missing), "--data",
                                         str(tiny_world[1]["eval"])))
    assert message == (f"--megatron-dir: {missing}/opd_megatron.json: not found; {missing} is "
                       "not an opd-megatron checkpoint")


def test_eval_csv_and_missing_data(ckpt, files):
    message = one_line_error(run_command("eval", "--megatron-dir", ckpt, "--data",
                                         str(files / "eval.csv")))
    assert message == f"{files}/eval.csv: unsupported dataset extension '.csv' (use .jsonl or .parquet)"
    message = one_line_error(run_command("eval", "--megatron-dir", ckpt, "--data",
                                         str(files / "none.jsonl")))
    assert message == f"{files}/none.jsonl: dataset file not found"


def test_generate_prompts_not_utf8(ckpt, files, tmp_path):
    out = tmp_path / "gen.jsonl"
    message = one_line_error(run_command("generate", "--megatron-dir", ckpt, "--prompts",
                                         str(files / "latin1.jsonl"), "--out", str(out)))
    assert message == (f"{files}/latin1.jsonl:1: field '<utf-8>': not UTF-8 (byte 0xe9 at "
                       "column 16)")
    assert not out.exists()
