"""Write SFT traces (step 2 of the README's pipeline) by sampling a teacher checkpoint:

    python tools/make_sft_traces.py --megatron-dir TEACHER --prompts train.jsonl \
        --out sft_traces.jsonl [--reward math --samples-per-prompt 4 --temperature 0.7]

The same as `python -m opd_megatron sft-traces` (opd_megatron/cli/sft_traces.py); under
torchrun for a teacher split over several ranks (--tp/--pp).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":
    from opd_megatron.cli import main

    sys.exit(main(["sft-traces", *sys.argv[1:]]))
