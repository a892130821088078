"""Runs a TrainingRun spec to completion in one process: what `kontinue train` (in a pod) and
`kontinue run` (on a workstation) share.

Each call is one attempt: it resumes from the newest valid checkpoint in the run directory,
and either finishes the run or stops at a safe resume point when asked to (exit code 75).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kontinue.api.models import TrainingRun
from kontinue.api.reports import status_line
from kontinue.storage import LocalStore, open_store
from kontinue.trainer.callbacks import PREEMPTED_EXIT_CODE, Preempted
from kontinue.trainer.data import read_table
from kontinue.trainer.predictor import Predictor
from kontinue.trainer.rundir import BEST, RunDirectory, open_run_directory

log = logging.getLogger("kontinue.trainer")
TERMINATION_LOG = "/dev/termination-log"


@dataclass
class Outcome:
    """The attempt's last word; the operator reads it from the pod's termination message."""

    result: str  # "succeeded" | "preempted"
    step: int | None = None
    run_dir: str = ""
    model: str | None = None
    checkpoint: dict[str, Any] | None = None  # the resume point a preempted attempt left
    dump: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    test_scores: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.result == "succeeded" else PREEMPTED_EXIT_CODE


def write_termination_message(outcome: Outcome, path: str | None = None) -> None:
    """Kubernetes shows this file as the container's termination message (4 KiB at most)."""
    path = path or os.environ.get("KONTINUE_TERMINATION_LOG", TERMINATION_LOG)
    if Path(path).parent.is_dir():
        try:
            Path(path).write_text(json.dumps(outcome.__dict__)[:4096])
        except OSError as error:
            log.debug("no termination message written: %s", error)


def _continue_from(run: TrainingRun, run_dir_uri: str, scratch: Path) -> Predictor | None:
    """Use case 1: the predictor continueFrom names, brought onto this machine.

    An earlier TrainingRun of the same namespace lives beside this run's directory.
    """
    source = run.spec.continue_from
    if source is None:
        return None
    uri = source.model_uri or f"{run_dir_uri.rstrip('/').rpartition('/')[0]}/{source.training_run}"
    store = open_store(uri)
    if isinstance(store, LocalStore):
        return Predictor.load(store.root)
    store.sync_down(scratch / "continue-from")
    return Predictor.load(scratch / "continue-from")


def report_to_stdout(status: dict[str, Any]) -> None:
    """The status line the operator reads from the pod's log."""
    print(status_line(status), flush=True)


def run_training(run: TrainingRun, run_dir_uri: str, *, scratch: str | os.PathLike | None = None,
                 progress_bar: bool = False, report: Callable[[dict[str, Any]], None] | None = None) -> Outcome:
    """One attempt at `run`, in `run_dir_uri`; returns how it ended. `report` gets status.json
    after every write."""
    scratch = Path(scratch or tempfile.mkdtemp(prefix="kontinue-"))
    run_dir = open_run_directory(run_dir_uri, scratch / "run")
    run_dir.report = report
    spec = run.spec
    if run_dir.status.get("phase") == "Succeeded" and not run_dir.has_resume_point():
        log.info("run %s already succeeded; nothing to do", run_dir.uri)
        return _outcome(run_dir, "succeeded")
    train = read_table(spec.data.train)
    validation = read_table(spec.data.validation) if spec.data.validation else None
    if run_dir.has_resume_point():
        predictor = Predictor.load(run_dir.path, resume=True, run_dir=run_dir)
        predictor.enable_progress_bar = progress_bar
    else:
        predictor = _continue_from(run, run_dir_uri, scratch) or Predictor(
            label=spec.task.label, problem_type=spec.task.problem_type, eval_metric=spec.task.eval_metric,
            hyperparameters=spec.effective_hyperparameters())
        predictor.enable_progress_bar = progress_bar
        predictor.use_run_directory(run_dir)
    try:
        predictor.fit(train, validation, time_limit=spec.time_limit_seconds(), seed=spec.seed,
                      hyperparameters=spec.effective_hyperparameters() if spec.continue_from else None)
    except Preempted as stop:
        log.warning("stopped at step %d; the next attempt resumes there", stop.step)
        return _outcome(run_dir, "preempted", step=stop.step)
    test_scores = predictor.evaluate(read_table(spec.data.test)) if spec.data.test else {}
    dump = predictor.dump_model() if spec.dump_model else None
    run_dir.update_status(testMetrics=test_scores or None)
    return _outcome(run_dir, "succeeded", test_scores=test_scores, dump=dump and run_dir.status.get("dumpedModel"))


def _outcome(run_dir: RunDirectory, result: str, **fields: Any) -> Outcome:
    status = run_dir.status
    return Outcome(result=result, run_dir=run_dir.uri, step=fields.pop("step", status.get("step")),
                   model=f"{run_dir.uri.rstrip('/')}/{BEST}" if result == "succeeded" else None,
                   checkpoint=status.get("lastCheckpoint") if result == "preempted" else None,
                   scores=status.get("metrics") or {}, dump=fields.pop("dump", status.get("dumpedModel")),
                   **fields)
