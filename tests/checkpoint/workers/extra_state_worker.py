"""A CPU-written checkpoint (local layer spec: no `_extra_state` anywhere) loaded into a model
whose final norm carries an extra state, as Transformer Engine's norms do; and into one with a
weight the checkpoint lacks.

    extra_state_worker.py OUT_DIR       prints {"extra_state": ..., "missing_weight": ...}
"""
import json
import sys
from pathlib import Path

import torch

from opd_megatron.checkpoint.megatron_dist import CheckpointError, load_model, save_model
from opd_megatron.config.schema import ParallelConfig, PrecisionConfig
from opd_megatron.models.arch import ModelArch
from opd_megatron.models.builder import build_model_chunks
from opd_megatron.runtime import distributed as rd

ARCH = ModelArch(model_type="qwen3", vocab_size=200, hidden_size=32, intermediate_size=64,
                 num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def with_extra_state(module: torch.nn.Module) -> None:
    """Give `module` an `_extra_state` entry the way TE modules have one (FP8 scaling meta)."""
    class WithExtraState(type(module)):
        def get_extra_state(self):
            return torch.tensor([1.0])

        def set_extra_state(self, state):
            raise AssertionError("no extra state was saved, so none may be loaded")

    module.__class__ = WithExtraState


def main():
    out = Path(sys.argv[1])
    parallel = ParallelConfig()
    rd.initialize(parallel, seed=0)
    saved = build_model_chunks(ARCH, parallel, PrecisionConfig())
    save_model(saved, out / "ckpt")
    result = {}

    chunks = build_model_chunks(ARCH, parallel, PrecisionConfig())
    with_extra_state(chunks[0].decoder.final_layernorm)
    assert "decoder.final_layernorm._extra_state" in chunks[0].state_dict()
    load_model(chunks, out / "ckpt")
    result["extra_state"] = all(torch.equal(a, b) for a, b in
                                zip(saved[0].parameters(), chunks[0].parameters()))

    chunks = build_model_chunks(ARCH, parallel, PrecisionConfig())
    norm = chunks[0].decoder.final_layernorm
    norm.register_parameter("bias", torch.nn.Parameter(torch.zeros_like(norm.weight)))
    try:
        load_model(chunks, out / "ckpt")
        result["missing_weight"] = "loaded"
    except CheckpointError as err:
        result["missing_weight"] = str(err)
    rd.shutdown()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
