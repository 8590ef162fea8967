"""Render a run's metric curves to PNG: one panel per metric, one line per run; and with
`--phases`, where each step's time went (stacked per-phase seconds, one panel per run).

    python tools/plot_metrics.py runs/demo/opd_student runs/demo/opsd_rule_student \
        --keys loss student_support_mass topk_overlap --out runs/demo/curves.png
    python tools/plot_metrics.py runs/demo/rlvr_teacher --phases --out runs/demo/phases.png
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opd_megatron.trainer.metrics import read_metrics  # noqa: E402

DEFAULT_KEYS = ("loss", "reward", "eval/accuracy", "student_support_mass", "topk_overlap",
                "student_entropy", "response_length", "hedging_frequency", "grad_norm", "lr",
                "rollout/logprob_diff_max", "clip_fraction", "tokens_per_second")


def read_runs(run_dirs: list[Path]) -> dict[str, list[dict]]:
    histories = {}
    for run in run_dirs:
        path = run / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no metrics (is {run} a run directory?)")
        histories[run.name] = read_metrics(path)
    return histories


def save(fig, out: Path) -> None:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_runs(run_dirs: list[Path], keys: list[str], out: Path) -> list[str]:
    """Plot `keys` present in any run; returns the keys drawn."""
    histories = read_runs(run_dirs)
    drawn = [k for k in keys if any(k in row for h in histories.values() for row in h)]
    if not drawn:
        raise ValueError(f"none of the keys {', '.join(keys)} appear in {', '.join(map(str, run_dirs))}")
    cols = min(3, len(drawn))
    rows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, drawn):
        for name, history in histories.items():
            points = [(r["step"], r[key]) for r in history if key in r]
            if points:
                ax.plot(*zip(*points), label=name, marker="." if len(points) < 30 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    save(fig, out)
    return drawn


def plot_phases(run_dirs: list[Path], out: Path) -> list[str]:
    """Each run's per-step `time/<phase>` seconds stacked (training steps only); returns the
    phases drawn, those with any time in any run."""
    histories = read_runs(run_dirs)
    phases = sorted({k for h in histories.values() for row in h for k in row
                     if k.startswith("time/") and row[k] > 0 and row["step"] > 0})
    if not phases:
        raise ValueError(f"no per-phase timings (time/*) in {', '.join(map(str, run_dirs))}")
    fig, axes = plt.subplots(1, len(histories), figsize=(5.5 * len(histories), 3.6),
                             squeeze=False)
    for ax, (name, history) in zip(axes.flat, histories.items()):
        rows = [r for r in history if r["step"] > 0]
        steps = [r["step"] for r in rows]
        bottom = [0.0] * len(rows)
        for key in phases:
            seconds = [r.get(key, 0.0) for r in rows]
            ax.bar(steps, seconds, bottom=bottom, label=key.removeprefix("time/"), width=0.9)
            bottom = [b + s for b, s in zip(bottom, seconds)]
        ax.set_title(f"{name}: seconds per step")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, axis="y")
    axes.flat[0].legend(fontsize=8)
    save(fig, out)
    return [p.removeprefix("time/") for p in phases]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS))
    parser.add_argument("--phases", action="store_true",
                        help="draw the per-phase time breakdown instead of metric curves")
    parser.add_argument("--out", type=Path, default=Path("runs/curves.png"))
    args = parser.parse_args(argv)
    try:
        drawn = (plot_phases(args.runs, args.out) if args.phases
                 else plot_runs(args.runs, args.keys, args.out))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
