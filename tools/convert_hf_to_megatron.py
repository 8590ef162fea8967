"""Convert an HF safetensors checkpoint into a self-describing Megatron checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir HF_DIR --out MEGATRON_DIR [--dtype bf16] [--force]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opd_megatron.checkpoint.convert import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing's writer starts worker processes
    sys.exit(main("hf-to-megatron"))
