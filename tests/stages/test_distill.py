"""OPD and OPSD end to end on tiny models: layouts, the biased-TopK collapse, teacher checks."""
import json
import shutil
import subprocess
import sys

import pytest

from opd_megatron.config.loader import ConfigError
from opd_megatron.stages.config import StageConfig, TeacherSection, validate_stage_config
from opd_megatron.trainer.metrics import read_metrics
from tests.launch import REPO_ROOT
from tests.stages.conftest import make_checkpoint, stage_overrides, train


def opd_args(tiny_world, out, student, teacher, recipe="conf/opd_tiny_cpu_tp1.yaml", **extra):
    root, data = tiny_world
    values = {"data.train_path": data["train"], "model.megatron_dir": str(student),
              "trainer.global_batch_size": 8, **extra}
    if teacher is not None:
        values["teacher.megatron_dir"] = str(teacher)
    return ["--config", recipe, *stage_overrides(root, data, out, **values)]


@pytest.fixture(scope="module")
def sft_ckpt(sft_run):
    return sft_run[0] / "checkpoints" / "latest"


def losses(out):
    return [h["loss"] for h in read_metrics(out / "metrics.jsonl")]


def test_opd_at_tp2_and_pp2_matches_tp1(tiny_world, sft_ckpt, tmp_path):
    """Seeded rollouts and exact vocab-parallel teacher log-probs: every layout takes the same
    first step; the run logs every diagnostic; in every layout the trainer reproduces the
    native engine's fp32 log-probs."""
    root, _ = tiny_world
    student = root / "student"
    runs = {}
    for name, nproc, parallel in (("tp1", 1, {}), ("tp2", 2, {"parallel.tensor_parallel": 2}),
                                  ("pp2", 2, {"parallel.pipeline_parallel": 2})):
        out = tmp_path / name
        train(nproc, *opd_args(tiny_world, out, student, sft_ckpt, **{"trainer.steps": 2},
                               **parallel))
        runs[name] = read_metrics(out / "metrics.jsonl")
    first = runs["tp1"][0]
    for key in ("topk_overlap", "teacher_rank_of_sampled", "student_entropy", "kl_estimate",
                "student_support_mass", "teacher_support_mass", "teacher_logprob",
                "teacher_student_logprob_gap", "response_length", "repetition_3gram",
                "hedging_frequency", "gen_kl_error", "time/teacher", "tokens_per_second"):
        assert key in first, key
    assert first["time/teacher"] > 0 and first["time/generate"] > 0
    for name, history in runs.items():
        assert all(h["rollout/logprob_diff_max"] < 1e-5 for h in history), name
    for name in ("tp2", "pp2"):
        assert runs[name][0]["loss"] == pytest.approx(first["loss"], rel=1e-4)
        assert runs[name][0]["topk_overlap"] == pytest.approx(first["topk_overlap"], rel=1e-4)


def test_biased_topk_collapses_student_support_mass_stop_gradient_does_not(tiny_world, sft_ckpt,
                                                                           tmp_path):
    """Teacher = the student's own weights isolates the bias: the stop-gradient loss then has no
    gradient, while the biased form's gradient is exactly grad(P_S) (docs/LOSSES.md)."""
    mass = {}
    for loss in ("topk_rkl", "topk_rkl_sg"):
        out = tmp_path / loss
        train(1, *opd_args(tiny_world, out, sft_ckpt, sft_ckpt, **{
            "trainer.steps": 8, "distill.loss": loss, "distill.top_k": 4,
            "optimizer.lr": 3.0e-3, "optimizer.warmup_steps": 0}))
        mass[loss] = [h["student_support_mass"] for h in read_metrics(out / "metrics.jsonl")]
    biased, fixed = mass["topk_rkl"], mass["topk_rkl_sg"]
    assert biased[0] == pytest.approx(fixed[0])           # same start
    assert biased[-1] < 0.6 * biased[0]                    # mass pushed out of the top-K
    assert min(fixed) > fixed[0] - 0.1                     # stays put


@pytest.mark.parametrize("source", ["initial", "live"])
def test_opsd_system_prompt_runs(tiny_world, sft_ckpt, tmp_path, source):
    root, data = tiny_world
    out = tmp_path / source
    train(1, *opd_args(tiny_world, out, sft_ckpt, None, recipe="conf/opsd_tiny_cpu_tp1.yaml", **{
        "trainer.steps": 2, "teacher.source": source, "data.train_path": data["rule"],
        "data.eval_path": data["eval"], "eval.reward": "exact_match",
        "distill.metrics_every": 2}))
    history = read_metrics(out / "metrics.jsonl")
    assert len(history) == 2 and all(h["loss"] == h["loss"] for h in history)
    assert history[0]["teacher_logprob"] < 0
    assert all(h["rollout/logprob_diff_max"] < 1e-5 for h in history)
    # The full-vocabulary diagnostics come every metrics_every steps only.
    assert "topk_overlap" in history[0] and "topk_overlap" not in history[1]


def test_sampled_pg_with_tis_logs_its_weights(tiny_world, tmp_path):
    """TIS on the sampled-token OPD estimator: the fp32 native engine matches the trainer, so the
    weights are 1."""
    root, _ = tiny_world
    out = tmp_path / "tis"
    train(1, *opd_args(tiny_world, out, root / "student", root / "student", **{
        "trainer.steps": 1, "distill.loss": "sampled_pg", "rollout.tis_cap": 2.0,
        "data.eval_path": "null"}))
    (row,) = read_metrics(out / "metrics.jsonl")
    assert abs(row["tis/weight_mean"] - 1) < 1e-5 and row["tis/weight_max"] < 1 + 1e-5
    assert row["rollout/logprob_diff_max"] < 1e-5 and row["loss"] == row["loss"]


def run_cli_error(*args):
    proc = subprocess.run([sys.executable, "-m", "opd_megatron", "train", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_teacher_with_other_tokenizer_is_rejected(tiny_world, sft_ckpt, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(sft_ckpt, teacher, symlinks=False)
    tok = json.loads((teacher / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<other>"
    (teacher / "tokenizer.json").write_text(json.dumps(tok))
    root, _ = tiny_world
    line = run_cli_error(*opd_args(tiny_world, tmp_path / "out", root / "student", teacher))
    assert "its tokenizer differs from the student's" in line


def test_teacher_that_lost_its_weights_stops_the_run(tiny_world, tmp_path):
    root, _ = tiny_world
    teacher = make_checkpoint(tmp_path / "ckpt" / "zero_teacher", zero=True)
    shutil.copy(root / "student" / "tokenizer.json", teacher / "tokenizer.json")
    line = run_cli_error(*opd_args(tiny_world, tmp_path / "out", root / "student", teacher))
    assert line.startswith("error: teacher log-probs all equal -ln(V)")


def test_teacher_temperature_must_match_student(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    cfg = StageConfig(stage="opsd", teacher=TeacherSection(source="initial", temperature=0.7))
    cfg.teacher.pi.mode = "system_prompt"
    cfg.data.train_path = str(data)
    cfg.trainer.global_batch_size = cfg.trainer.micro_batch_size = 4
    with pytest.raises(ConfigError, match="teacher.temperature=0.7 differs from distill.temperature=1.0"):
        validate_stage_config(cfg, dp_size=1, where="x.yaml")


def test_metrics_every_must_be_positive(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    cfg = StageConfig(stage="opsd", teacher=TeacherSection(source="initial"))
    cfg.teacher.pi.mode = "system_prompt"
    cfg.data.train_path = str(data)
    cfg.trainer.global_batch_size = cfg.trainer.micro_batch_size = 4
    cfg.distill.metrics_every = 0
    with pytest.raises(ConfigError, match="distill.metrics_every=0 must be >= 1"):
        validate_stage_config(cfg, dp_size=1, where="x.yaml")
