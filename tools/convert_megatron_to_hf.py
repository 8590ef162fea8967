"""Export a Megatron checkpoint (saved at any TP/PP layout) as HF safetensors.

    python tools/convert_megatron_to_hf.py --megatron-dir MEGATRON_DIR --out HF_DIR \
        [--dtype bf16] [--max-shard-size 5GB] [--force]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from opd_megatron.checkpoint.convert import main

    sys.exit(main("megatron-to-hf"))
