"""Benchmark checkpoint conversion against a plain safetensors copy of the same bytes.

    python tools/bench_convert.py --out runs/bench/convert.md [--workdir DIR] [--rounds 3]

Builds a synthetic Llama-shaped bf16 HF checkpoint (default ~1.1B parameters: hidden 2048, 16
layers, FFN 8192, vocab 32000, untied) straight from random tensors, then measures, each in a fresh
process and in rounds (every step once per round, so that all steps see the same machine state):
  plain copy:    safetensors `load_file` + `save_file`, shard by shard (the reference);
  hf->megatron:  tools/convert_hf_to_megatron.py's conversion;
  megatron->hf:  tools/convert_megatron_to_hf.py's conversion (of this round's hf->megatron output);
and the same three with an fsync of every written file (`--fsync` for the conversions). The table
gives the median over the rounds, their spread, and each step's speed against the plain copy of its
kind (fsync or not). Seconds are those of the work itself: process start, imports (megatron-core's
included) and the memory preparation below are in `wall`. Peak RSS is the process's high-water
mark (VmHWM) over the work, imports included.

Before its clock starts, each step touches and frees twice the checkpoint's size of memory, so
that every step finds the same free memory ready for its writes. The virtual machine this was
written on hands free guest memory back to its host within seconds, and faulting it in again costs
more than the copies themselves (kernel time of a 2.2 GB write varied 1-6 s with what had just been
freed); a step would otherwise be timed on what the previous step happened to free. On a machine
with its own RAM this changes nothing. Every step runs with THP_MEM_ALLOC_ENABLE=1, as the
conversion tools set it. A workdir on tmpfs (/dev/shm) takes the disk out of the measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GB = 1e9


def llama_config(hidden: int, layers: int, ffn: int, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 256,
            "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": False, "hidden_act": "silu",
            "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


def build_synthetic(hf_dir: Path, config: dict, shard_size: str) -> int:
    """Write random bf16 tensors for `config` through the mapping's HF specs; returns bytes."""
    import torch

    from opd_megatron.checkpoint.hf_io import ShardedWriter, parse_size
    from opd_megatron.checkpoint.mapping import mapping_for
    from opd_megatron.models.arch import ModelArch

    hf_dir.mkdir(parents=True)
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2))
    mapping = mapping_for(ModelArch.from_hf_dict(config))
    specs = [(name, shape, torch.bfloat16) for name, shape in mapping.hf_specs()]
    gen = torch.Generator().manual_seed(0)
    with ShardedWriter(hf_dir, specs, parse_size(shard_size)) as writer:
        for name, shape, dtype in specs:
            writer.write(name, (torch.randn(shape, generator=gen) * 0.02).to(dtype))
        writer.finish()
    return writer.total_bytes


def plain_copy(src: Path, dst: Path, fsync: bool) -> None:
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in sorted(src.glob("*.safetensors")):
        tensors = load_file(f)
        save_file(tensors, dst / f.name, metadata={"format": "pt"})
        del tensors
        if fsync:
            with open(dst / f.name, "rb") as written:
                os.fsync(written.fileno())
    for f in src.glob("*.json"):
        shutil.copy2(f, dst / f.name)


# (step, source dir, output dir), in the order of a round.
STEPS = [("plain copy", "hf", "copy"),
         ("hf->megatron", "hf", "megatron"),
         ("megatron->hf", "megatron", "hf_back"),
         ("plain copy + fsync", "hf", "copy_fsync"),
         ("hf->megatron + fsync", "hf", "megatron_fsync"),
         ("megatron->hf + fsync", "megatron_fsync", "hf_back_fsync")]


def reset_peak_rss() -> None:
    """Start the process's peak resident set (VmHWM) over from its current size (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def run_step(step: str, src: str, dst: str) -> None:
    """One measured step, in this (fresh) process; prints a JSON line."""
    from opd_megatron.checkpoint import convert

    name, fsync = step.removesuffix(" + fsync"), step.endswith(" + fsync")
    if name != "plain copy":
        # Import cost is start-up, like the plain copy's torch import: it shows in `wall`.
        import megatron.core.dist_checkpointing  # noqa: F401
        import megatron.core.models.gpt  # noqa: F401
    import torch

    source_bytes = sum(f.stat().st_size for f in Path(src).rglob("*") if f.is_file())
    torch.empty(2 * source_bytes, dtype=torch.uint8).fill_(1)  # see the module docstring
    reset_peak_rss()
    start, phases = time.time(), {}
    if name == "plain copy":
        plain_copy(Path(src), Path(dst), fsync)
    elif name == "hf->megatron":
        phases = convert.convert_hf_to_megatron(src, dst, fsync=fsync, progress=False).phases
    else:
        phases = convert.convert_megatron_to_hf(src, dst, fsync=fsync, progress=False).phases
    seconds = time.time() - start
    print(json.dumps({"seconds": seconds, "phases": phases, "rss": peak_rss()}), flush=True)


def measure(step: str, src: Path, dst: Path) -> dict:
    os.sync()  # the previous step's dirty pages must not be flushed on this step's time
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--step", step, str(src), str(dst)],
                          capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "THP_MEM_ALLOC_ENABLE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"error: step {step!r} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "wall": time.time() - start}


def baseline_rss() -> int:
    """ru_maxrss of a process that only imports what the conversion imports (torch, megatron)."""
    code = ("import resource, megatron.core.dist_checkpointing, opd_megatron.checkpoint.convert; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                          text=True, cwd=REPO_ROOT, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


def table(runs: dict[str, list[dict]], nbytes: int, params: int, base: int, workdir: Path) -> str:
    median = {step: statistics.median(r["seconds"] for r in rs) for step, rs in runs.items()}
    lines = [f"Synthetic Llama-shaped bf16 checkpoint: {params / 1e9:.2f}B parameters, "
             f"{nbytes / GB:.2f} GB, in {workdir}; {len(next(iter(runs.values())))} rounds; "
             f"imports alone (torch + megatron-core): {base / GB:.2f} GB RSS.", "",
             "| step | seconds (median) | min-max | GB/s | speed vs plain copy | phases (s, median "
             "round) | peak RSS (GB) | x checkpoint | wall incl. start-up (s) |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for step, rs in runs.items():
        reference = median["plain copy + fsync" if step.endswith("fsync") else "plain copy"]
        middle = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]
        phases = ", ".join(f"{k} {v:.1f}" for k, v in middle["phases"].items()) or "-"
        rss = max(r["rss"] for r in rs)
        seconds = [r["seconds"] for r in rs]
        lines.append(f"| {step} | {median[step]:.2f} | {min(seconds):.2f}-{max(seconds):.2f} | "
                     f"{nbytes / GB / median[step]:.2f} | {reference / median[step]:.2f} | "
                     f"{phases} | {rss / GB:.2f} | {rss / nbytes:.2f} | "
                     f"{statistics.median(r['wall'] for r in rs):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench/convert.md", help="markdown table")
    parser.add_argument("--workdir", default="runs/bench/convert_work",
                        help="scratch space (about 3x the checkpoint; removed afterwards)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each step")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="1GB", help="synthetic checkpoint shard size")
    parser.add_argument("--step", nargs=3, metavar=("STEP", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(*args.step)
        return 0
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    config = llama_config(args.hidden, args.layers, args.ffn, args.vocab)
    nbytes = build_synthetic(work / "hf", config, args.shard_size)
    runs: dict[str, list[dict]] = {step: [] for step, _, _ in STEPS}
    try:
        for round_index in range(args.rounds):
            for step, src, dst in STEPS:
                runs[step].append(measure(step, work / src, work / dst))
                print(f"round {round_index + 1} {step}: {json.dumps(runs[step][-1])}", flush=True)
                # Keep only the source checkpoint and the Megatron one the next step exports.
                for done in (src, dst):
                    if done != "hf" and not (done == dst and done.startswith("megatron")):
                        shutil.rmtree(work / done)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = table(runs, nbytes, nbytes // 2, baseline_rss(), work)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
