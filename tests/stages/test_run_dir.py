"""Run directories at the CLI: a finished run is refused, not replayed into a no-op; a resume is
checked against the run that wrote the checkpoint; an unreadable checkpoint is named (auto falls
back to the previous one); history is continued, never replaced or duplicated."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from opd_megatron.trainer.metrics import read_metrics
from tests.launch import REPO_ROOT, free_port
from tests.stages.conftest import TINY, make_checkpoint, sft_args
from tests.user_errors import one_line_error, run_command, succeeded

STEPS = {"trainer.steps": 4, "trainer.save_every": 2}


def train(tiny_world, out, **extra):
    return run_command("train", *sft_args(tiny_world, out, **{"data.eval_path": "null",
                                                                **STEPS, **extra}))


def snapshot(out):
    """Everything a refused command must leave as it was."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    succeeded(train(tiny_world, out))
    return out


def refused(tiny_world, finished, tmp_path, **extra):
    """Run against a copy of the finished run; the copy must be untouched; returns the message."""
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    before = snapshot(out)
    message = one_line_error(train(tiny_world, out, **extra))
    assert snapshot(out) == before
    return out, message


def test_a_finished_run_is_refused_and_left_intact(tiny_world, finished, tmp_path):
    out, message = refused(tiny_world, finished, tmp_path)
    assert message == (f"{out}/checkpoints/iter_0000004: the run already finished (iteration 4, "
                       "trainer.steps=4); use a new output_dir, or raise trainer.steps and list "
                       "it in trainer.resume_overrides to train on")
    assert [h["step"] for h in json.loads((out / "history.json").read_text())] == [1, 2, 3, 4]


@pytest.mark.parametrize("override,key,was,now", [
    ({"optimizer.lr": 0.01, "trainer.steps": 6}, "optimizer.lr", "0.003", "0.01"),
    ({"trainer.steps": 6}, "trainer.steps", "4", "6"),
])
def test_a_changed_schedule_is_refused_naming_the_key(tiny_world, finished, tmp_path, override,
                                                      key, was, now):
    out, message = refused(tiny_world, finished, tmp_path, **override)
    assert message == (f"{out}/checkpoints/iter_0000004: {key} was {was} in the checkpoint, {now} "
                       "now; list it in trainer.resume_overrides to let the config win, or use a "
                       "new output_dir")


def test_another_model_is_refused_naming_the_changed_fields(tiny_world, finished, tmp_path):
    other = make_checkpoint(tmp_path / "wide", shape={**TINY, "hidden_size": 96})
    out, message = refused(tiny_world, finished, tmp_path, **{"model.megatron_dir": other})
    assert message == (f"{out}/checkpoints/iter_0000004: model was {{'hidden_size': 64}} in the "
                       "checkpoint, {'hidden_size': 96} now; use a new output_dir")


def test_another_dataset_is_refused(tiny_world, finished, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt": "1+1=", "response": "2"}\n')
    out, message = refused(tiny_world, finished, tmp_path, **{"data.train_path": other})
    assert message.startswith(f"{out}/checkpoints/iter_0000004: data.train_path was {{'path': ")
    assert message.endswith("list it in trainer.resume_overrides to let the config win, or use "
                            "a new output_dir")


def test_resume_none_into_an_existing_run_is_refused(tiny_world, finished, tmp_path):
    out, message = refused(tiny_world, finished, tmp_path, **{"trainer.resume": "none"})
    assert message == (f"conf/sft_tiny_cpu_tp1.yaml: trainer.resume=none but {out}/checkpoints "
                       "already holds iter_0000004; use a new output_dir (or trainer.resume=auto "
                       "to continue that run)")


def test_an_override_lets_the_config_win_and_history_is_continued(tiny_world, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    earlier = read_metrics(out / "metrics.jsonl")
    succeeded(train(tiny_world, out, **{"trainer.steps": 6, "optimizer.lr": 0.01,
                                        "trainer.resume_overrides": "[trainer.steps,optimizer.lr]"}))
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[:4] == earlier
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    # The new peak lr, decayed over the new 6 steps (cosine), not the checkpoint's 0.003.
    assert rows[4]["lr"] > 0.003


def test_replayed_steps_are_logged_once(tiny_world, finished, tmp_path):
    """A crash after step 4 but before its save: the resume replays 3 and 4, and the first
    attempt's rows for them move to metrics.replayed.jsonl."""
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    first = read_metrics(out / "metrics.jsonl")
    shutil.rmtree(out / "checkpoints" / "iter_0000004")
    succeeded(train(tiny_world, out))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert read_metrics(out / "metrics.replayed.jsonl") == first[2:]
    assert [h["step"] for h in json.loads((out / "history.json").read_text())] == [1, 2, 3, 4]


def shard(ckpt):
    return sorted((ckpt / "model").glob("*.distcp"))[0]


def test_a_truncated_checkpoint_is_named_and_auto_falls_back(tiny_world, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    newest = out / "checkpoints" / "iter_0000004"
    broken = shard(newest)
    size = broken.stat().st_size
    broken.write_bytes(broken.read_bytes()[: size // 2])
    (out / "checkpoints" / ".tmp_iter_0000003").mkdir()     # a save a crash interrupted
    proc = succeeded(train(tiny_world, out, **{"trainer.save_every": 0}))
    assert (f"warning: resume: skipping iter_0000004: {broken}: truncated ({size // 2} bytes, "
            f"the index needs {size})") in proc.stderr
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
    assert not (out / "checkpoints" / ".tmp_iter_0000003").exists()


def test_an_explicit_unreadable_or_missing_checkpoint_is_one_line(tiny_world, finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    ckpt = out / "checkpoints" / "iter_0000002"
    (ckpt / "train_state" / "rng_rank0.pt").write_bytes(b"PK\x03\x04 not a zip")
    message = one_line_error(train(tiny_world, tmp_path / "new", **{"trainer.resume": ckpt}))
    assert message.startswith(f"{ckpt}/train_state/rng_rank0.pt: unreadable (")
    missing = tmp_path / "nowhere"
    message = one_line_error(train(tiny_world, tmp_path / "new", **{"trainer.resume": missing}))
    assert message == f"{missing}: checkpoint directory not found"
    assert not (tmp_path / "new").exists()


def test_an_unknown_resume_override_is_refused(tiny_world, tmp_path):
    message = one_line_error(train(tiny_world, tmp_path,
                                   **{"trainer.resume_overrides": "[parallel.tensor_parallel]"}))
    assert message.startswith("conf/sft_tiny_cpu_tp1.yaml: trainer.resume_overrides: "
                              "'parallel.tensor_parallel' cannot be overridden (one of: ")


def test_another_tensor_parallel_size_is_refused_on_every_rank(tiny_world, finished, tmp_path):
    """Under torchrun each rank refuses before any process group (torchrun then reports the
    failed ranks itself)."""
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    before = snapshot(out)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
         "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "opd_megatron", "train",
         *sft_args(tiny_world, out, **{"data.eval_path": "null", **STEPS,
                                       "parallel.tensor_parallel": 2})],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
             "PYTHONWARNINGS": "ignore"})
    assert proc.returncode != 0
    line = (f"error: {out}/checkpoints/iter_0000004: parallel.tensor_parallel was 1 in the "
            "checkpoint, 2 now; use a new output_dir")
    assert proc.stderr.splitlines().count(line) == 2, proc.stderr[-3000:]
    assert "opd_megatron/stages/" not in proc.stderr     # no rank's traceback
    assert snapshot(out) == before
