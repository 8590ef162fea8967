"""Benchmark the vocab-parallel distillation loss: against gathering the vocabulary, or (--peers)
against NeMo-RL's distributed top-k path and a copy baseline.

    python -m torch.distributed.run --nproc-per-node 2 tools/bench_loss.py --out runs/bench/loss.md
    python -m torch.distributed.run --nproc-per-node 2 tools/bench_loss.py --peers \
        --out runs/bench/loss_peers.md

--peers, at V=--vocabs[0], for each --shapes (batch x seq) and fp32 / bf16 inputs, forward +
backward of:
  copy:                 the physical floor: read both shards, write one gradient (student +
                        teacher, in the input dtype);
  ours topk_rkl_sg:     the default objective, support=student, no metrics (a step between
                        `distill.metrics_every`);
  ours topk_rkl_norm:   support=teacher, no metrics;
  nemo-rl reverse:      NeMo-RL's teacher top-k (distributed_vocab_topk, as its teacher pass
                        computes it) and its renormalised reverse KL (kl_type=reverse,
                        zero_outside_topk=False), vendored in tools/peers/nemo_rl_topk.py, the
                        same objective as topk_rkl_norm with support=teacher.
The cases run interleaved (every method of a shape and dtype, then the next; --repeats rounds; the
shapes in --big-shapes once each at the end), each in fresh processes. Time: the median of --reps
steps after a warm-up, the slowest rank, then the median over rounds; memory as below.

Without --peers:
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
from tools.peers import nemo_rl_topk  # noqa: E402

METHODS = ("vocab-parallel", "gather")
PEER_METHODS = ("copy", "ours topk_rkl_sg", "ours topk_rkl_norm", "nemo-rl reverse")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
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


class _Copy(torch.autograd.Function):
    """Reads both shards and writes one gradient, in backward; the forward reads nothing."""

    @staticmethod
    def forward(ctx, student, teacher):
        ctx.save_for_backward(student, teacher)
        return student.new_zeros(student.shape[:-1], dtype=torch.float32)

    @staticmethod
    def backward(ctx, _grad):
        student, teacher = ctx.saved_tensors
        return torch.add(student, teacher), None


def copy_step(student, teacher, top_k):
    token_mean(_Copy.apply(student, teacher)).backward()


def ours_step(loss, support):
    def step(student, teacher, top_k):
        per_token, _ = vocab_parallel_distill_loss(student, teacher, loss=loss, top_k=top_k,
                                                   support=support, tp_group=dist.group.WORLD,
                                                   with_metrics=False)
        token_mean(per_token).backward()
    return step


def nemo_rl_step(student, teacher, top_k):
    group, rank, width = dist.group.WORLD, dist.get_rank(), student.shape[-1]
    values, ids = nemo_rl_topk.distributed_vocab_topk(
        teacher, top_k, group, vocab_start_index=rank * width,
        vocab_end_index=(rank + 1) * width)
    student_lp, teacher_lp = nemo_rl_topk.get_distillation_topk_logprobs_from_logits(
        student, values, ids, vocab_parallel_rank=rank, vocab_parallel_group=group)
    nemo_rl_topk.distillation_per_token_kl(student_lp, teacher_lp, "reverse").mean().backward()


STEPS = {"vocab-parallel": vocab_parallel_step, "gather": gather_step, "copy": copy_step,
         "ours topk_rkl_sg": ours_step("topk_rkl_sg", "student"),
         "ours topk_rkl_norm": ours_step("topk_rkl_norm", "teacher"),
         "nemo-rl reverse": nemo_rl_step}


def run_case(args) -> None:
    """One (vocabulary, method) case on this rank; prints a JSON line."""
    dist.init_process_group("gloo")
    torch.manual_seed(dist.get_rank())
    width = args.vocab // dist.get_world_size()
    dtype = DTYPES[args.dtype]
    # Drawn in their dtype: an fp32 draw cast to bf16 would leave its peak in ru_maxrss.
    student = torch.randn(args.batch, args.seq, width, dtype=dtype).requires_grad_()
    teacher = torch.randn(args.batch, args.seq, width, dtype=dtype)
    step = STEPS[args.case]
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


def launch_case(args, vocab: int, method: str, batch: int | None = None, seq: int | None = None,
                dtype: str = "fp32") -> dict:
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
           str(seq or args.seq), "--batch", str(batch or args.batch), "--top-k", str(args.top_k),
           "--reps", str(args.reps), "--dtype", dtype]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"case {method} V={vocab} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    return {"time_s": max(r["time_s"] for r in results),
            "extra_bytes": max(r["extra_bytes"] for r in results),
            "shard_bytes": results[0]["shard_bytes"], "load": os.getloadavg()[0]}


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


def peer_rounds(args) -> dict:
    """{(batch, seq, dtype): {method: [result per round]}}, interleaved; big shapes last, once."""
    vocab = args.vocabs[0]
    plan = [shape for _ in range(args.repeats) for shape in args.shapes] + args.big_shapes
    results: dict = {}
    for batch, seq in plan:
        for dtype in args.dtypes:
            for method in PEER_METHODS:
                result = launch_case(args, vocab, method, batch, seq, dtype)
                results.setdefault((batch, seq, dtype), {}).setdefault(method, []).append(result)
    return results


def peer_table(args, results, load: tuple[float, float]) -> str:
    loads = [r["load"] for cases in results.values() for rs in cases.values() for r in rs]
    lines = [
        f"Distillation loss against NeMo-RL (at {nemo_rl_topk.COMMIT[:12]}) and a copy, V={args.vocabs[0]}, K={args.top_k}, TP={dist.get_world_size()} (gloo, "
        f"CPU, 1 thread per rank); forward + backward; time = median over rounds of the median "
        f"of {args.reps} steps, slowest rank; extra memory = peak RSS over the RSS with the input "
        f"shards allocated, gradient included (largest rank and round).",
        f"Load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f}, over the cases "
        f"{min(loads):.1f}-{max(loads):.1f}, on {os.cpu_count()} CPUs.",
        "",
        "| batch x seq | dtype | method | rounds | time (s) | extra (MiB) | time / copy | "
        "NeMo-RL time / time | memory / NeMo-RL |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for (batch, seq, dtype), cases in results.items():
        time = {m: statistics.median(r["time_s"] for r in rs) for m, rs in cases.items()}
        extra = {m: max(r["extra_bytes"] for r in rs) for m, rs in cases.items()}
        peer = "nemo-rl reverse"
        for method in PEER_METHODS:
            lines.append(
                f"| {batch} x {seq} | {dtype} | {method} | {len(cases[method])} | "
                f"{time[method]:.3f} | {extra[method] / MIB:.0f} | "
                f"{time[method] / time['copy']:.2f}x | {time[peer] / time[method]:.2f}x | "
                f"{extra[method] / extra[peer]:.2f}x |")
        speed = time[peer] / time["ours topk_rkl_norm"]
        memory = extra["ours topk_rkl_norm"] / extra[peer]
        copy = time["ours topk_rkl_sg"] / time["copy"]
        verdicts.append(
            f"- {batch} x {seq} {dtype}: topk_rkl_norm (teacher) is {speed:.2f}x faster than "
            f"NeMo-RL (target >= 1.3x: {_verdict(speed >= 1.3, speed / 1.3)}) at {memory:.2f}x "
            f"its memory (target <= 1x: {_verdict(memory <= 1.0, 1 / memory)}); topk_rkl_sg "
            f"takes {copy:.2f}x the copy (target <= 2x: {_verdict(copy <= 2.0, 2.0 / copy)}).")
    return "\n".join(lines + ["", *verdicts]) + "\n"


def _verdict(met: bool, factor: float) -> str:
    return "met" if met else f"missed by {1 / factor:.2f}x"


def parse_shape(text: str) -> tuple[int, int]:
    batch, _, seq = text.partition("x")
    try:
        return int(batch), int(seq)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not BATCHxSEQ, e.g. 2x1024")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "bench" / "loss.md")
    parser.add_argument("--vocabs", type=int, nargs="+",
                        help="default 32000 64000 151936; --peers: 151936")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--peers", action="store_true",
                        help="against NeMo-RL and the copy baseline (at the first --vocabs)")
    parser.add_argument("--shapes", type=parse_shape, nargs="+", default=[(2, 1024)],
                        help="--peers: BATCHxSEQ shapes run --repeats rounds, interleaved")
    parser.add_argument("--big-shapes", type=parse_shape, nargs="*", default=[(1, 4096)],
                        help="--peers: shapes run once each, after the rounds")
    parser.add_argument("--repeats", type=int, default=3, help="--peers: rounds of --shapes")
    parser.add_argument("--dtypes", choices=tuple(DTYPES), nargs="+", default=list(DTYPES),
                        help="--peers: input dtypes")
    parser.add_argument("--case", choices=tuple(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return run_case(args)
    if args.vocabs is None:
        args.vocabs = [151936] if args.peers else [32000, 64000, 151936]
    dist.init_process_group("gloo")
    load_start = os.getloadavg()[0]
    if args.peers:
        results = peer_rounds(args)
    else:
        rows = [(vocab, {m: launch_case(args, vocab, m) for m in METHODS})
                for vocab in args.vocabs]
    if dist.get_rank() == 0:
        load = (load_start, os.getloadavg()[0])
        report = peer_table(args, results, load) if args.peers else table(args, rows, load)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(report)
        tmp.replace(args.out)
        print(report)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
