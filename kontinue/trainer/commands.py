"""`kontinue train` (what trainer pods run) and `kontinue run` (the same on this machine)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kontinue.api.contract import INVALID_SPEC_EXIT_CODE, InvalidInput
from kontinue.api.manifests import Problem, SpecError, load_manifest, parse_resource
from kontinue.api.models import TrainingRun, TransferRun
from kontinue.api.reports import dumps

if TYPE_CHECKING:  # the runner imports torch: only once a run starts
    from kontinue.trainer.runner import Outcome

DEFAULT_STORE = ".kontinue"


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="run one attempt of a TrainingRun or TransferRun "
                                  "(trainer pods run this)")
    train.add_argument("--spec", required=True, help="TrainingRun or TransferRun manifest (YAML or JSON), "
                       "or env:NAME to read it from a variable")
    train.add_argument("--run-dir", required=True, help="run directory URI (s3://..., file://... or a path)")
    train.add_argument("--scratch", default=os.environ.get("KONTINUE_SCRATCH"),
                       help="local working directory (default: a temporary directory)")
    train.set_defaults(func=_train)

    run = subparsers.add_parser("run", help="train a TrainingRun or TransferRun manifest on this machine; "
                                "rerun to resume")
    run.add_argument("manifest", help="TrainingRun or TransferRun manifest")
    run.add_argument("--store", default=DEFAULT_STORE,
                     help=f"where run directories live (default: ./{DEFAULT_STORE}/)")
    run.set_defaults(func=_run)


def _quiet_libraries() -> None:
    """Lightning's banners and tips are noise in a trainer's log; our own lines say what happens."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|treespec).*")


def _load(path: str) -> TrainingRun | TransferRun | None:
    """A manifest file, or `env:NAME` for one passed in an environment variable (as pods get it)."""
    try:
        if path.startswith("env:"):
            text = os.environ.get(path[4:])
            if text is None:
                raise SpecError([Problem("", f"environment variable {path[4:]} is not set")])
            run = parse_resource(yaml.safe_load(text))
        else:
            run = load_manifest(Path(path))
    except SpecError as error:
        print(f"{path}: {error}", file=sys.stderr)
        return None
    return run


def _attempt(path: str, run: TrainingRun | TransferRun, run_dir: str, **options: Any) -> Outcome | None:
    """run_training; a spec the run's inputs refute (a TransferRun's source lacks spec.backbones, the
    data has no column a model can use, a family this trainer cannot run) is reported like an invalid
    manifest, and the caller exits INVALID_SPEC_EXIT_CODE: retrying cannot help."""
    from kontinue.trainer.runner import run_training, write_termination_message

    try:
        return run_training(run, run_dir, **options)
    except (SpecError, InvalidInput) as error:
        message = str(error) if isinstance(error, SpecError) else f"invalid input: {error}"
        print(f"{path}: {message}", file=sys.stderr)
        write_termination_message(message)
        return None


def _other_rank() -> bool:
    """A further rank of a DDP fit (Lightning runs the command once more per rank): it exits with its
    outcome's code (0 once its part of the fit is done, 75 stopped at the same resume point as rank
    0) and reports nothing; rank 0 writes the termination message and says how the attempt ended."""
    from kontinue.trainer.fitting import process_rank

    return process_rank() != 0


def _train(args: argparse.Namespace) -> int:
    from kontinue.trainer.runner import report_to_stdout, write_termination_message

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    run = _load(args.spec)
    if run is None:
        return INVALID_SPEC_EXIT_CODE
    outcome = _attempt(args.spec, run, args.run_dir, scratch=args.scratch, report=report_to_stdout)
    if outcome is None:
        return INVALID_SPEC_EXIT_CODE
    if _other_rank():
        return outcome.exit_code
    write_termination_message(outcome)
    print(dumps(outcome.__dict__))
    return outcome.exit_code


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("kontinue").setLevel(logging.INFO)
    _quiet_libraries()
    run = _load(args.manifest)
    if run is None:
        return INVALID_SPEC_EXIT_CODE
    namespace = run.metadata.namespace or "default"
    run_dir = f"{args.store.rstrip('/')}/{namespace}/{run.metadata.name}"
    outcome = _attempt(args.manifest, run, run_dir, progress_bar=True)
    if outcome is None:
        return INVALID_SPEC_EXIT_CODE
    if _other_rank():
        return outcome.exit_code
    if outcome.result == "superseded":  # another attempt claimed the run directory meanwhile
        print(f"\n{outcome.message}", file=sys.stderr)
        return outcome.exit_code
    if outcome.result == "preempted":
        print(f"\nStopped at step {outcome.step}; the state is saved in {outcome.run_dir}.\n"
              f"Run the same command again to resume.")
        return outcome.exit_code
    print(f"\nTraining finished. Run directory: {outcome.run_dir}")
    for title, scores in (("validation", outcome.scores), ("test", outcome.test_scores)):
        if scores:
            print(f"  {title}: " + ", ".join(f"{name}={value:.4f}" for name, value in scores.items()))
    print(f"  best model: {outcome.model}")
    if outcome.dump:
        print(f"  dumped backbones: {outcome.dump}")
    return 0
