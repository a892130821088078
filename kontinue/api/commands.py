"""`kontinue crds` and `kontinue validate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from kontinue.api.crd import HEADER, build_crds, to_yaml, write_crds
from kontinue.api.manifests import describe, document_problems, is_kontinue, load_documents, parse_resource
from kontinue.operator.pods import pod_problems


def register(subparsers: argparse._SubParsersAction) -> None:
    crds = subparsers.add_parser("crds", help="print the CustomResourceDefinitions (or write them with --out)")
    crds.add_argument("--out", type=Path, metavar="DIR", help="write one file per CRD into DIR")
    crds.set_defaults(func=_crds)
    validate = subparsers.add_parser(
        "validate", help="check TrainingRun/TransferRun manifests against the models and the CRDs")
    validate.add_argument("files", nargs="+", metavar="FILE", help="YAML files; - reads stdin")
    validate.add_argument("--in-cluster", action="store_true", help=(
        "also report what cannot work in a trainer pod: file paths in spec.data and "
        "spec.checkpoint.storage that no volume of spec.volumes holds"))
    validate.set_defaults(func=_validate)


def _crds(args: argparse.Namespace) -> int:
    if args.out:
        for path in write_crds(args.out):
            print(f"wrote {path}")
    else:
        sys.stdout.write(HEADER + "---\n".join(to_yaml(crd) for crd in build_crds()))
    return 0


def _validate(args: argparse.Namespace) -> int:
    """Exit status: 0 all valid, 1 a document has problems, 2 a file could not be read or parsed."""
    status = 0
    for name in args.files:
        label = "<stdin>" if name == "-" else name
        try:
            documents = load_documents(sys.stdin.read() if name == "-" else Path(name).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            print(f"{label}: cannot read: {error}", file=sys.stderr)
            status = 2
            continue
        for index, document in enumerate(documents, 1):
            if document is None:  # an empty document, such as after a trailing ---
                continue
            if not isinstance(document, dict):
                print(f"{label}:{index}: not a Kubernetes object (a YAML mapping)")
                status = max(status, 1)
                continue
            where = f"{label}:{index}: {describe(document)}"
            if not is_kontinue(document):
                print(f"{where}: skipped (not a kontinue resource)")
                continue
            problems = document_problems(document)
            if args.in_cluster and not problems:
                problems = pod_problems(parse_resource(document))
            for problem in problems:
                print(f"{where}: {problem}")
            if not problems:
                print(f"{where}: valid")
            status = max(status, 1 if problems else 0)
    return status
