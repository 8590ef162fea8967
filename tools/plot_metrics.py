"""Render a run's metric curves to PNG: one panel per metric, one line per run.

    python tools/plot_metrics.py runs/demo/opd_student runs/demo/opsd_rule_student \
        --keys loss student_support_mass topk_overlap --out runs/demo/curves.png
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
                "student_entropy", "response_length", "hedging_frequency", "grad_norm", "lr")


def plot_runs(run_dirs: list[Path], keys: list[str], out: Path) -> list[str]:
    """Plot `keys` present in any run; returns the keys drawn."""
    histories = {}
    for run in run_dirs:
        path = run / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no metrics (is {run} a run directory?)")
        histories[run.name] = read_metrics(path)
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
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--keys", nargs="+", default=list(DEFAULT_KEYS))
    parser.add_argument("--out", type=Path, default=Path("runs/curves.png"))
    args = parser.parse_args(argv)
    try:
        drawn = plot_runs(args.runs, args.keys, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
