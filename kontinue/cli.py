"""The `kontinue` command: each area of the package contributes its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define `register(subparsers)`; each subcommand sets `func` to its handler.
_COMMAND_MODULES = ("kontinue.api.commands", "kontinue.trainer.commands", "kontinue.storage.commands",
                    "kontinue.operator.commands")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kontinue", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
