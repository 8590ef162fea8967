"""OPD's teacher and sampling checks at the CLI: a teacher with another vocabulary is named with
both sizes; sampling at another temperature than the loss reads is refused for sampled_pg (its
estimator is then off-policy) and warned about otherwise."""
import json
import shutil

from tests.stages.test_distill import opd_args
from tests.user_errors import one_line_error, run_command


def test_teacher_with_another_vocab_size_names_both(tiny_world, tmp_path):
    root, _ = tiny_world
    teacher = tmp_path / "teacher"
    shutil.copytree(root / "student", teacher)
    meta = json.loads((teacher / "opd_megatron.json").read_text())
    student_vocab = meta["arch"]["vocab_size"]
    meta["arch"]["vocab_size"] = student_vocab + 8
    (teacher / "opd_megatron.json").write_text(json.dumps(meta))
    message = one_line_error(run_command("train", *opd_args(tiny_world, tmp_path / "out",
                                                            root / "student", teacher)))
    assert message == (f"teacher.megatron_dir={teacher}: vocab_size={student_vocab + 8}, the "
                       f"student's is {student_vocab}; OPD needs the same token ids")


def test_sampled_pg_at_another_temperature_is_refused(tiny_world, tmp_path):
    root, _ = tiny_world
    message = one_line_error(run_command("train", *opd_args(
        tiny_world, tmp_path / "out", root / "student", root / "student",
        **{"distill.loss": "sampled_pg", "rollout.temperature": 0.7})))
    assert message == ("conf/opd_tiny_cpu_tp1.yaml: rollout.temperature=0.7 differs from "
                       "distill.temperature=1.0: sampled_pg's estimator is on-policy only for "
                       "responses sampled at the temperature the loss reads the student at")
    assert not (tmp_path / "out").exists()


def test_other_losses_at_another_temperature_are_warned_about(tiny_world, tmp_path):
    root, _ = tiny_world
    proc = run_command("train", *opd_args(
        tiny_world, tmp_path / "out", root / "student", root / "student",
        **{"rollout.temperature": 0.7, "trainer.steps": 1, "trainer.save_every": -1,
           "data.eval_path": "null"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("warning: conf/opd_tiny_cpu_tp1.yaml: rollout.temperature=0.7 differs from "
            "distill.temperature=1.0: responses are sampled from another distribution than the "
            "one the loss matches to the teacher") in proc.stderr
