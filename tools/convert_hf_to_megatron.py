"""Convert an HF safetensors checkpoint into a self-describing Megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir HF_DIR --out MEGATRON_DIR [--dtype bf16] [--force]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# dist_checkpointing starts a multiprocessing Manager (spawn), which re-runs this file's top level:
# import nothing heavy outside the guard.
if __name__ == "__main__":
    from opd_megatron.checkpoint.convert import main

    sys.exit(main("hf-to-megatron"))
