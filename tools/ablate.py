"""The paper's comparisons at toy scale: one table (markdown + JSON) and one figure.

    python tools/ablate.py                         # every arm, on runs/demo's checkpoints
    python tools/ablate.py --groups loss tail_leak --steps 30 --eval-n 256

Reuses the demo's checkpoints (tools/run_demo.py builds them, or this tool does on first use) and
runs each arm as a short stage from them: the OPD loss (biased TopK, stop-gradient TopK,
renormalised, tail bucket, full-vocabulary RKL, sampled policy gradient), the teacher (RLVR-adapted
or the SFT teacher), the student (SFT-warmed or raw), equal-budget baselines (more SFT, GRPO on
the student; same steps and sequences per step) and the tail-leak arms (the stop-gradient form at
a high learning rate under Adam, under SGD, with a larger K). A finished arm is read back, not
rerun. Writes OUT/ablation.md, OUT/ablation.json and OUT/ablation.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import run_demo  # noqa: E402
from tools.plot_metrics import plot_runs  # noqa: E402

RECIPES = {"opd": "conf/opd_tiny_cpu_tp1.yaml", "sft": "conf/sft_tiny_cpu_tp1.yaml",
           "rlvr": "conf/rlvr_tiny_cpu_tp1.yaml"}
# Per-step curves drawn in the figure and summarised (first -> last) in the table.
CURVES = ("kl_estimate", "student_support_mass", "student_entropy", "response_length",
          "teacher_rank_of_sampled", "hedging_frequency")
FIGURE_KEYS = ("eval/accuracy", *CURVES)
GROUPS = ("loss", "teacher", "student", "baseline", "tail_leak")


@dataclass(frozen=True)
class Arm:
    name: str
    group: str
    stage: str  # a RECIPES key
    what: str
    overrides: dict = field(default_factory=dict)


def arms(demo: Path) -> list[Arm]:
    """Every arm, on the demo's layout (run_demo.build_base); the demo's OPD recipe is the
    reference each arm changes one thing of."""
    data = {"train": demo / "data" / "train.jsonl", "sft": demo / "data" / "sft_train.jsonl"}
    opd_optimizer = yaml.safe_load((REPO / RECIPES["opd"]).read_text())["optimizer"]
    opd_lr = {"optimizer.lr": opd_optimizer["lr"], "optimizer.min_lr": opd_optimizer["min_lr"]}
    student, raw = demo / "sft_student" / "checkpoints" / "latest", demo / "models" / "student_megatron"
    opd = {"model.megatron_dir": student,
           "teacher.megatron_dir": demo / "rlvr_teacher" / "checkpoints" / "latest",
           "data.train_path": data["train"]}
    losses = ("topk_rkl", "topk_rkl_sg", "topk_rkl_norm", "topk_rkl_tail", "full_rkl", "sampled_pg")
    grpo = {"model.megatron_dir": student, "data.train_path": data["train"],
            "trainer.global_batch_size": 2, "rollout.samples_per_prompt": 8}
    out = [Arm(f"loss_{loss}", "loss", "opd", f"OPD, loss {loss}", {**opd, "distill.loss": loss})
           for loss in losses]
    out += [
        Arm("teacher_sft", "teacher", "opd", "OPD from the SFT teacher (not RLVR-adapted)",
            {**opd, "teacher.megatron_dir": demo / "sft_teacher" / "checkpoints" / "latest"}),
        Arm("student_raw", "student", "opd", "OPD into the raw (not SFT-warmed) student",
            {**opd, "model.megatron_dir": raw}),
        # Equal budget: OPD's steps, 16 sequences per step and learning rate.
        Arm("baseline_sft", "baseline", "sft", "more SFT on the student (equal budget)",
            {"model.megatron_dir": student, "data.train_path": data["sft"], **opd_lr}),
        Arm("baseline_grpo", "baseline", "rlvr", "GRPO on the student (2 prompts x 8 samples)",
            {**grpo, **opd_lr}),
        # GRPO at the RLVR recipe's own rate, in case OPD's is too high for a policy gradient.
        Arm("baseline_grpo_lr5e-5", "baseline", "rlvr", "GRPO on the student, lr 5e-5", grpo),
    ]
    # The stop-gradient form at a rate where it collapses under Adam, then one change each.
    high = {**opd, "distill.loss": "topk_rkl_sg", "optimizer.lr": 1e-3, "optimizer.min_lr": 1e-4}
    out += [
        Arm("leak_biased_adam", "tail_leak", "opd", "topk_rkl (biased), Adam, lr 1e-3",
            {**high, "distill.loss": "topk_rkl"}),
        Arm("leak_sg_adam", "tail_leak", "opd", "topk_rkl_sg, Adam, lr 1e-3", high),
        *(Arm(name, "tail_leak", "opd", f"topk_rkl_sg, SGD (momentum 0.9), lr {lr}",
              {**high, "optimizer.name": "sgd", "optimizer.lr": lr, "optimizer.min_lr": lr / 10,
               "parallel.distributed_optimizer": "false"})
          for name, lr in (("leak_sg_sgd", 0.03), ("leak_sg_sgd_fast", 0.3))),
        Arm("leak_sg_k64", "tail_leak", "opd", "topk_rkl_sg, Adam, lr 1e-3, K=64",
            {**high, "distill.top_k": 64}),
        Arm("leak_tail_adam", "tail_leak", "opd", "topk_rkl_tail, Adam, lr 1e-3",
            {**high, "distill.loss": "topk_rkl_tail"}),
    ]
    return out


def run_arm(root: Path, arm: Arm, eval_path: Path, steps: int, eval_n: int, seed: int) -> dict:
    eval_every = max(1, steps // 2)
    result = run_demo.train(root, RECIPES[arm.stage], f"{arm.name}_seed{seed}", {
        **arm.overrides, "data.eval_path": eval_path, "trainer.tensorboard": "false",
        "eval.num_examples": eval_n, "trainer.steps": steps, "trainer.eval_every": eval_every,
        "seed": seed}, reuse=True)
    history = result["history"]
    curves = {}
    for key in CURVES:
        values = [h[key] for h in history if key in h]
        if values:
            curves[key] = {"first": values[0], "last": values[-1]}
    return {"arm": arm.name, "group": arm.group, "what": arm.what, "seed": seed,
            "before": result["before"], "after": result["after"],
            "gain": result["after"] - result["before"], "curves": curves,
            "dir": str(root / f"{arm.name}_seed{seed}")}


def markdown(rows: list[dict], steps: int, eval_n: int) -> str:
    head = ["arm", "what", "acc before", "acc after", "gain", "KL est.", "top-K mass", "entropy",
            "resp. length", "teacher rank", "hedging"]
    lines = [f"Each arm: {steps} steps from the demo's checkpoints, greedy accuracy on {eval_n} "
             "held-out sums; curves first -> last logged step.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arm"], r["what"], f"{r['before']:.3f}", f"{r['after']:.3f}", f"{r['gain']:+.3f}"]
        for key in CURVES:
            c = r["curves"].get(key)
            cells.append(f"{c['first']:.3g} -> {c['last']:.3g}" if c else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=REPO / "runs" / "demo",
                        help="the demo's run directory (its checkpoints are reused)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "ablate")
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--arms", nargs="+", help="only these arm names")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-n", type=int, default=run_demo.HELD_OUT)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.eval_n < 1:
        print("error: --steps and --eval-n must be >= 1", file=sys.stderr)
        return 2
    demo = args.demo.resolve()
    every = arms(demo)
    chosen = [a for a in every if a.group in args.groups and (not args.arms or a.name in args.arms)]
    unknown = set(args.arms or ()) - {a.name for a in every}
    if unknown or not chosen:
        print(f"error: --arms: unknown ({', '.join(sorted(unknown)) or 'none'}) or none of them in "
              f"--groups; arms: {', '.join(a.name for a in every)}", file=sys.stderr)
        return 2
    base = run_demo.build_base(demo, 1.0, reuse=True)
    root = args.out.resolve()
    (root / "logs").mkdir(parents=True, exist_ok=True)
    rows = []
    for arm in chosen:
        run_demo.log(f"arm {arm.name}: {arm.what}")
        rows.append(run_arm(root, arm, base["data"]["eval"], args.steps, args.eval_n, args.seed))
        run_demo.log(f"  accuracy {rows[-1]['before']:.3f} -> {rows[-1]['after']:.3f}")
    (root / "ablation.json").write_text(json.dumps(
        {"steps": args.steps, "eval_n": args.eval_n, "seed": args.seed, "arms": rows}, indent=2))
    (root / "ablation.md").write_text(markdown(rows, args.steps, args.eval_n))
    plot_runs([Path(r["dir"]) for r in rows], list(FIGURE_KEYS), root / "ablation.png")
    print((root / "ablation.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
