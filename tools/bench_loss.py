"""Benchmark the vocab-parallel TopK RKL (stop-gradient) loss against gathering the vocabulary.

    python -m torch.distributed.run --nproc-per-node 2 tools/bench_loss.py --out runs/bench/loss.md

At TP = the number of ranks, for each vocabulary size, forward + backward of `topk_rkl_sg` with
K=20 on [batch, seq, V/tp] fp32 shards, two ways:
  vocab-parallel: `vocab_parallel_distill_loss` on the shards;
  gather:         all-gather both shards, full log-softmax of student and teacher, top-K, the same
                  loss, backward, and this rank's slice of the gradient (every rank computes the
                  same full loss, so no scatter is needed).
Each (vocabulary, method) runs in fresh processes (one per rank, their own gloo group) so that the
peak RSS of one case cannot hide another's: peak extra memory = ru_maxrss at the end minus the RSS
right after the input shards are allocated, the gradient included. Time is the median of --reps
runs after one warm-up, the slowest rank. The markdown table goes to --out and stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from opd_megatron.losses import token_mean, vocab_parallel_distill_loss  # noqa: E402
from opd_megatron.losses._comm import all_gather_cat  # noqa: E402

METHODS = ("vocab-parallel", "gather")
MIB = 1 << 20


def vocab_parallel_step(student, teacher, top_k):
    per_token, _ = vocab_parallel_distill_loss(student, teacher, loss="topk_rkl_sg", top_k=top_k,
                                               tp_group=dist.group.WORLD)
    token_mean(per_token).backward()


def gather_step(student, teacher, top_k):
    rank, width = dist.get_rank(), student.shape[-1]
    full_student = all_gather_cat(student.detach(), dist.group.WORLD, dim=-1).requires_grad_()
    full_teacher = all_gather_cat(teacher, dist.group.WORLD, dim=-1)
    logp = torch.log_softmax(full_student, dim=-1)
    support = logp.detach().topk(top_k, dim=-1).indices
    logp_s = logp.gather(-1, support)
    logq_s = torch.log_softmax(full_teacher, dim=-1).gather(-1, support)
    token_mean((logp_s.exp() * (logp_s - logq_s).detach()).sum(-1)).backward()
    student.grad = full_student.grad[..., rank * width:(rank + 1) * width].clone()


def run_case(args) -> None:
    """One (vocabulary, method) case on this rank; prints a JSON line."""
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    width = args.vocab // dist.get_world_size()
    student = torch.randn(args.batch, args.seq, width).requires_grad_()
    teacher = torch.randn(args.batch, args.seq, width)
    step = vocab_parallel_step if args.case == "vocab-parallel" else gather_step
    base_rss = psutil.Process().memory_info().rss
    times = []
    for _ in range(1 + args.reps):
        dist.barrier()
        start = time.perf_counter()
        step(student, teacher, args.top_k)
        times.append(time.perf_counter() - start)
        student.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"time_s": statistics.median(times[1:]), "extra_bytes": peak - base_rss,
                      "shard_bytes": student.numel() * student.element_size()}))
    dist.destroy_process_group()


def launch_case(args, vocab: int, method: str) -> dict:
    """Start this rank's process for one case; rank 0 picks the rendezvous port for all."""
    port = [free_port() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(port, src=0)
    # Without the TORCHELASTIC_* variables the child hosts its own store instead of waiting for
    # torchrun's agent store at our fresh port.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env = {**inherited, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port[0]),
           "RANK": str(dist.get_rank()), "WORLD_SIZE": str(dist.get_world_size()),
           "LOCAL_RANK": str(dist.get_rank())}
    cmd = [sys.executable, __file__, "--case", method, "--vocab", str(vocab), "--seq",
           str(args.seq), "--batch", str(args.batch), "--top-k", str(args.top_k), "--reps",
           str(args.reps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"case {method} V={vocab} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    return {"time_s": max(r["time_s"] for r in results),
            "extra_bytes": max(r["extra_bytes"] for r in results),
            "shard_bytes": results[0]["shard_bytes"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(args, rows, load: tuple[float, float]) -> str:
    lines = [
        f"TopK RKL (stop-gradient), K={args.top_k}, batch {args.batch} x seq {args.seq}, fp32, "
        f"TP={dist.get_world_size()} (gloo, CPU, 1 thread per rank); forward + backward; "
        f"extra memory = peak RSS over the RSS with the input shards allocated, gradient included.",
        # Times on a shared machine depend on what else runs: say how loaded it was.
        f"Load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f} on "
        f"{os.cpu_count()} CPUs.",
        "",
        "| vocab | local shard | method | time (s) | peak extra (MiB) | extra / shard | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for vocab, results in rows:
        base_time = results["gather"]["time_s"]
        for method in METHODS:
            r = results[method]
            lines.append(
                f"| {vocab} | {r['shard_bytes'] / MIB:.0f} MiB | {method} | {r['time_s']:.2f} | "
                f"{r['extra_bytes'] / MIB:.0f} | {r['extra_bytes'] / r['shard_bytes']:.2f} | "
                f"{base_time / r['time_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "bench" / "loss.md")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32000, 64000, 151936])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--case", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return run_case(args)
    dist.init_process_group("gloo")
    load_start = os.getloadavg()[0]
    rows = [(vocab, {m: launch_case(args, vocab, m) for m in METHODS}) for vocab in args.vocabs]
    if dist.get_rank() == 0:
        report = table(args, rows, (load_start, os.getloadavg()[0]))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        print(report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
