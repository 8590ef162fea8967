"""Export a Megatron checkpoint (saved at any TP/PP layout) as HF safetensors.

    python tools/convert_megatron_to_hf.py --megatron-dir MEGATRON_DIR --out HF_DIR \
        [--dtype bf16] [--max-shard-size 5GB] [--force] [--fsync]
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    # Read before torch's first allocation: large CPU tensors go on transparent huge pages. All
    # converted bytes land in fresh memory, and 4 KiB page faults cost about as much as the copies.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # A host-memory job: the Megatron model it builds is the CPU one, whatever GPUs are around.
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from opd_megatron.checkpoint.convert import main

    sys.exit(main("megatron-to-hf"))
