"""Worker for test_refit_precision.py: a bf16 student refit at TP=2 or PP=2 against its HF export.

Every rank streams the refit (as each colocated vLLM worker would); rank 0 then exports the same
weights, saved as a Megatron checkpoint, with the HF conversion tool, and compares both streams
tensor by tensor, bit for bit.
"""
import json
import sys
from pathlib import Path

import torch

from opd_megatron.checkpoint.convert import convert_megatron_to_hf
from opd_megatron.checkpoint.megatron_dist import save_model, write_metadata
from opd_megatron.config.schema import ParallelConfig, PrecisionConfig
from opd_megatron.models.arch import ModelArch
from opd_megatron.rollout.refit import refit, tensor_bytes
from opd_megatron.runtime import distributed as rd
from opd_megatron.trainer.engine import build_frozen
from tests.rollout.archs import tiny_arch

BUCKET_BYTES = 40_000


def check(arch: ModelArch, parallel: ParallelConfig, out: Path) -> dict:
    from safetensors.torch import load_file

    chunks = build_frozen(arch, parallel, PrecisionConfig(precision="bf16"))
    stream: list[tuple[str, torch.Tensor]] = []
    stats = refit(lambda bucket: stream.extend((n, t.clone()) for n, t in bucket), chunks, arch,
                  BUCKET_BYTES)
    save_model(chunks, out / "megatron")
    rank = torch.distributed.get_rank()
    if rank == 0:
        write_metadata(out / "megatron", arch)
    torch.distributed.barrier()
    report = {}
    if rank == 0:
        convert_megatron_to_hf(out / "megatron", out / "hf", progress=False)
        exported = {}
        for shard in sorted((out / "hf").glob("*.safetensors")):
            exported.update(load_file(shard))
        report = {
            "names_equal": [n for n, _ in stream] == list(exported),
            "dtypes": sorted({str(t.dtype) for _, t in stream}),
            "bit_identical": all(name in exported and t.dtype == exported[name].dtype
                                 and torch.equal(t.view(torch.int16), exported[name].view(torch.int16))
                                 for name, t in stream),
            "refit_bytes": stats.bytes,
            "parameter_bytes": sum(tensor_bytes(t) for t in exported.values()),
            "bf16_parameter_bytes": sum(t.numel() * 2 for t in exported.values()),
        }
    return report


def main():
    out, tp, pp = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    parallel = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp)
    rd.initialize(parallel, seed=1234)
    reports = {f"{model_type}/{'tied' if tied else 'untied'}":
               check(tiny_arch(model_type, tied), parallel, out / f"{model_type}_{tied}")
               for model_type, tied in (("qwen3", True), ("llama", False))}
    rank = torch.distributed.get_rank()
    rd.shutdown()
    if rank == 0:
        print(json.dumps(reports), flush=True)


if __name__ == "__main__":
    main()
