"""`python -m opd_megatron <command>`: one module per command, each exposing add_parser/run."""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> module under opd_megatron.cli
COMMANDS = {
    "smoke": "smoke",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_megatron",
                                     description="On-policy distillation on Megatron-core.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"opd_megatron.cli.{module_name}")
        module.add_parser(sub)
        modules[name] = module
    args = parser.parse_args(argv)
    from opd_megatron.config.loader import ConfigError

    try:
        return modules[args.command].run(args) or 0
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
