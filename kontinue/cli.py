"""The `kontinue` command: each area of the package contributes its own subcommands."""

from __future__ import annotations

import argparse
import importlib
import sys

from kontinue.trainer.signals import defer_stop_signals

# Modules that define `register(subparsers)`; each subcommand sets `func` to its handler.
_COMMAND_MODULES = ("kontinue.api.commands", "kontinue.trainer.commands", "kontinue.storage.commands",
                    "kontinue.operator.commands")
# Commands that train keep a stop signal (kontinue.trainer.signals) from their first instant, before
# the command modules (pydantic, kopf, the S3 client) are imported: a pod deleted then still ends with a
# resume point. Installed here only, for both commands.
_TRAINING_COMMANDS = ("train", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kontinue", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in _TRAINING_COMMANDS:
        defer_stop_signals()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
