"""`kontinue delete-run-dir`: what the cleanup pod of a deleted TrainingRun runs."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("delete-run-dir", help="delete a run directory (s3://..., file://... or a path)")
    parser.add_argument("uri", help="run directory URI; S3 credentials come from KONTINUE_S3_* / AWS_*")
    parser.set_defaults(func=_delete_run_dir)


def _delete_run_dir(args: argparse.Namespace) -> int:
    from kontinue.storage import StorageError, open_store

    try:
        count = open_store(args.uri).delete_all()
    except StorageError as error:
        print(f"could not delete {args.uri}: {error}", file=sys.stderr)
        return 1
    print(f"deleted {count} objects from {args.uri}")
    return 0
