"""Write a random-init tiny Megatron checkpoint with the synthetic-task tokenizer (stage tests)."""
import json
import sys
from pathlib import Path

from opd_megatron.checkpoint.megatron_dist import save_model, write_metadata
from opd_megatron.config.schema import ParallelConfig, PrecisionConfig
from opd_megatron.data.tiny_tokenizer import build_tiny_tokenizer
from opd_megatron.data.tokenizer import load_tokenizer
from opd_megatron.models.arch import ModelArch
from opd_megatron.models.builder import build_model_chunks
from opd_megatron.runtime import distributed as rd
from opd_megatron.checkpoint.hf_io import copy_side_files


def main():
    out, shape, seed = Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
    zero = len(sys.argv) > 4 and sys.argv[4] == "zero"   # a teacher that "lost its weights"
    tok_dir = build_tiny_tokenizer(out.parent / "tokenizer")
    tok = load_tokenizer(tok_dir)
    arch = ModelArch(model_type="qwen3", vocab_size=tok.vocab_size,
                     eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
                     **{"head_dim": 16, **shape})
    rd.initialize(ParallelConfig(), seed=seed)
    chunks = build_model_chunks(arch, ParallelConfig(), PrecisionConfig())
    if zero:
        for param in chunks[0].parameters():
            param.data.zero_()
    save_model(chunks, out)
    write_metadata(out, arch)
    copy_side_files(tok_dir, out)
    rd.shutdown()


if __name__ == "__main__":
    main()
