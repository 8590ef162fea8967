"""Save a small sharded state dict with InProcessTorchDistSave (one process) and read it back with
megatron-core's own loader and with torch_dist_io; prints one JSON line of checks.

The state dict has what a converted model has: a parameter saved as two halves (the SwiGLU fc1,
two views of one storage) and a tensor whose bytes a `source` serves from elsewhere.
"""
import json
import sys


def main(out_dir: str) -> None:
    from pathlib import Path

    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from opd_megatron.checkpoint.torch_dist_io import InProcessTorchDistSave, iter_full_tensors
    from opd_megatron.config.schema import ParallelConfig
    from opd_megatron.runtime import distributed

    distributed.initialize(ParallelConfig(), seed=0)
    fc1 = torch.randn(1024, 256)                 # 1 MiB; each half is a view of its storage
    norm_param = torch.empty(256)                # never filled: its bytes come from `served`
    served = torch.randn(256)

    def state(fc1_tensor, norm_tensor):
        half = fc1_tensor.shape[0] // 2
        return {"fc1": [ShardedTensor.from_rank_offsets("fc1", fc1_tensor[:half], (0, 0, 2)),
                        ShardedTensor.from_rank_offsets("fc1", fc1_tensor[half:], (0, 1, 2))],
                "norm": ShardedTensor.from_rank_offsets("norm", norm_tensor)}

    asked = []

    def source(data):
        asked.append(list(data.shape))
        return served if data.data_ptr() == norm_param.data_ptr() else data

    model_dir = Path(out_dir)
    model_dir.mkdir(parents=True)
    dist_checkpointing.save(state(fc1, norm_param), str(model_dir),
                            sharded_strategy=InProcessTorchDistSave(source))
    loaded = dist_checkpointing.load(state(torch.empty_like(fc1), torch.empty(256)),
                                     str(model_dir))
    read = dict(iter_full_tensors(model_dir))
    stored = sum(f.stat().st_size for f in model_dir.glob("*.distcp"))
    print(json.dumps({
        "megatron_load_fc1": all(torch.equal(t, ref) for t, ref in zip(loaded["fc1"], fc1.chunk(2))),
        "megatron_load_norm": torch.equal(loaded["norm"], served),
        "read_fc1": torch.equal(read["fc1"], fc1),
        "read_norm": torch.equal(read["norm"], served),
        "stored_bytes": stored, "tensor_bytes": fc1.nbytes + served.nbytes,
        "asked": sorted(asked),
    }), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
