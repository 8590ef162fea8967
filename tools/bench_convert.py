"""Benchmark checkpoint conversion against a plain safetensors copy of the same bytes.

    python tools/bench_convert.py --out runs/bench/convert.md

Builds a synthetic Llama-shaped bf16 HF checkpoint (default ~1.1B parameters: hidden 2048, 16
layers, FFN 8192, vocab 32000, untied) straight from random tensors, then measures, each in a fresh
process:
  plain copy:    safetensors `load_file` + `save_file`, shard by shard (the reference), also
                 with an fsync per file (dist_checkpointing fsyncs what it writes);
  hf->megatron:  tools/convert_hf_to_megatron.py's conversion;
  megatron->hf:  tools/convert_megatron_to_hf.py's conversion.
Seconds are those of the work itself (process start and imports, megatron-core's included, are
excluded: they are in `wall`); peak RSS is the process's ru_maxrss, and that of its largest child (dist_checkpointing
writes and reads in forked workers) is reported next to it. Files are read from the page cache
(each was just written), which favours no method.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
    specs = [(n, s, torch.bfloat16) for n, s in mapping_for(ModelArch.from_hf_dict(config)).hf_specs()]
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


def run_step(step: str, src: str, dst: str) -> None:
    """One measured step, in this (fresh) process; prints a JSON line."""
    from opd_megatron.checkpoint import convert

    if not step.startswith("plain copy"):
        # Import cost is start-up, like the plain copy's torch import: it shows in `wall`.
        import megatron.core.dist_checkpointing  # noqa: F401
        import megatron.core.models.gpt  # noqa: F401
    start, phases = time.time(), {}
    if step.startswith("plain copy"):
        plain_copy(Path(src), Path(dst), fsync="fsync" in step)
    elif step == "hf->megatron":
        phases = convert.convert_hf_to_megatron(src, dst, progress=False).phases
    else:
        phases = convert.convert_megatron_to_hf(src, dst, progress=False).phases
    seconds = time.time() - start
    kib = 1024
    print(json.dumps({"seconds": seconds, "phases": phases,
                      "rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
                      "rss_child": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib}),
          flush=True)


def measure(step: str, src: Path, dst: Path) -> dict:
    os.sync()  # the previous step's dirty pages must not be flushed on this step's time
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--step", step, str(src), str(dst)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
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


def table(rows: dict, nbytes: int, params: int, base: int) -> str:
    plain = min(rows["plain copy"]["seconds"], rows["plain copy (again)"]["seconds"])
    lines = [f"Synthetic Llama-shaped bf16 checkpoint: {params / 1e9:.2f}B parameters, "
             f"{nbytes / GB:.2f} GB; imports alone (torch + megatron-core): "
             f"{base / GB:.2f} GB RSS.", "",
             "| step | seconds | GB/s | speed vs faster plain copy | phases (s) | peak RSS (GB) | "
             "x checkpoint | largest child RSS (GB) | wall incl. start-up (s) |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for step, r in rows.items():
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()) or "-"
        lines.append(f"| {step} | {r['seconds']:.1f} | {nbytes / GB / r['seconds']:.2f} | "
                     f"{plain / r['seconds']:.2f} | {phases} | {r['rss_self'] / GB:.2f} | "
                     f"{r['rss_self'] / nbytes:.2f} | {r['rss_child'] / GB:.2f} | {r['wall']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/bench/convert.md", help="markdown table")
    parser.add_argument("--workdir", default="runs/bench/convert_work",
                        help="scratch space (about 4x the checkpoint; removed afterwards)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="1GB", help="synthetic checkpoint shard size")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--step", nargs=3, metavar=("STEP", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        run_step(*args.step)
        return 0
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    config = llama_config(args.hidden, args.layers, args.ffn, args.vocab)
    nbytes = build_synthetic(work / "hf", config, args.shard_size)
    params = nbytes // 2
    rows = {}
    try:
        for step, src, dst in (("plain copy", "hf", "copy"),
                               ("plain copy + fsync", "hf", "copy_fsync"),
                               ("hf->megatron", "hf", "megatron"),
                               ("megatron->hf", "megatron", "hf_back"),
                               # The reference again: the spread of the two shows the noise.
                               ("plain copy (again)", "hf", "copy_again")):
            rows[step] = measure(step, work / src, work / dst)
            print(f"{step}: {json.dumps(rows[step])}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = table(rows, nbytes, params, baseline_rss())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
