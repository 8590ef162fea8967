"""`python -m opd_megatron <command>`: one module per command, each exposing add_parser/run."""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

# command -> module under opd_megatron.cli
COMMANDS = {
    "smoke": "smoke",
    "score": "score",
    "train": "train",
    "generate": "generate",
    "eval": "evaluate",
    "sft-traces": "sft_traces",
}


def main(argv: list[str] | None = None) -> int:
    import torch

    if not torch.cuda.is_available():
        # megatron-core says so four times on import; on CPU it is the expected setup, and it
        # would bury a one-line error.
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    parser = argparse.ArgumentParser(prog="python -m opd_megatron",
                                     description="On-policy distillation on Megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"opd_megatron.cli.{module_name}")
        module.add_parser(sub)
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return modules[args.command].run(args) or 0
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[Exception], ...]:
    """Problems with the user's inputs: reported as one line, without a traceback."""
    from opd_megatron.checkpoint.megatron_dist import CheckpointError
    from opd_megatron.config.loader import ConfigError
    from opd_megatron.data.dataset import DataError
    from opd_megatron.models.arch import ArchitectureError
    from opd_megatron.rewards.scoring import RewardError
    from opd_megatron.stages.distill import TeacherHealthError, TokenizerMismatchError
    from opd_megatron.stages.loop import NonFiniteLossError

    return (ConfigError, CheckpointError, DataError, ArchitectureError, RewardError,
            TeacherHealthError, TokenizerMismatchError, NonFiniteLossError)
