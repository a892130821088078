"""Runs a TrainingRun or TransferRun spec to completion in one process: what `kontinue train`
(in a pod) and `kontinue run` (on a workstation) share.

Each call is one attempt: it claims the run directory (kontinue.trainer.ownership: another spec's
directory is refused, a newer attempt's is left alone), resumes from the newest valid checkpoint in
it, and either finishes the run or stops at a safe resume point when asked to (exit code 75).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kontinue.api.manifests import Problem, SpecError
from kontinue.api.families import family_of
from kontinue.api.models import ModelSource, TrainingRun, TrainingRunSpec, TransferRun, TransferRunSpec
from kontinue.api.reports import status_line, termination_message
from kontinue.storage import LocalStore, Store, open_store
from kontinue.api.contract import PREEMPTED_EXIT_CODE, SUCCEEDED_EXIT_CODE, SUPERSEDED_EXIT_CODE
from kontinue.trainer.callbacks import Preempted
from kontinue.trainer.data import read_table
from kontinue.trainer.fitting import process_rank
from kontinue.trainer.ownership import Claimant, Superseded
from kontinue.trainer.predictor import Predictor
from kontinue.trainer.signals import STOP_REQUESTED
from kontinue.trainer.rundir import (BEST, COMPLETED, METADATA, RESUMABLE, STATUS, RunDirectory,
                                     open_run_directory)

log = logging.getLogger("kontinue.trainer")
TERMINATION_LOG = "/dev/termination-log"


@dataclass
class Outcome:
    """The attempt's last word; the operator reads it from the pod's termination message."""

    result: str  # "succeeded" | "preempted" | "superseded" (a newer attempt holds the run directory)
    step: int | None = None
    run_dir: str = ""
    model: str | None = None
    checkpoint: dict[str, Any] | None = None  # the resume point a preempted attempt left
    dump: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    test_scores: dict[str, float] = field(default_factory=dict)
    message: str | None = None  # why a superseded attempt stopped

    @property
    def exit_code(self) -> int:
        return {"succeeded": SUCCEEDED_EXIT_CODE, "superseded": SUPERSEDED_EXIT_CODE}.get(self.result,
                                                                                       PREEMPTED_EXIT_CODE)


def write_termination_message(outcome: Outcome | str, path: str | None = None) -> None:
    """Kubernetes shows this file as the container's termination message: the Outcome as JSON, or
    why the spec was refused, fitted to the 4 KiB it keeps (kontinue.api.reports.termination_message)."""
    path = path or os.environ.get("KONTINUE_TERMINATION_LOG", TERMINATION_LOG)
    message = termination_message(outcome if isinstance(outcome, str) else outcome.__dict__)
    if Path(path).parent.is_dir():
        try:
            Path(path).write_bytes(message)
        except OSError as error:
            log.debug("no termination message written: %s", error)


def _source_uri(source: ModelSource, run_dir_uri: str) -> str:
    """An earlier TrainingRun of the same namespace lives beside this run's directory."""
    return source.model_uri or f"{run_dir_uri.rstrip('/').rpartition('/')[0]}/{source.training_run}"


def _on_this_machine(store: Store, local_dir: Path, prefix: str = "") -> Path:
    """`prefix/` of `store` as a local directory: in place when it is local, else synced into `local_dir`."""
    if isinstance(store, LocalStore):
        return store.root / prefix
    store.sync_down(local_dir, prefix)
    return local_dir


def _continue_from(source: ModelSource, run_dir_uri: str, scratch: Path) -> Predictor:
    """Use case 1: the predictor continueFrom names, brought onto this machine."""
    return Predictor.load(_on_this_machine(open_store(_source_uri(source, run_dir_uri)), scratch / "continue-from"))


def _source_dumps(spec: TransferRunSpec, run_dir_uri: str, scratch: Path) -> tuple[str, dict[str, str]]:
    """Use case 3: the dump of each source backbone taken, on this machine (backbone -> directory),
    and the dump's URI. A source that was not dumped is loaded and dumped into scratch."""
    store = open_store(_source_uri(spec.source, run_dir_uri))
    if not store.exists(METADATA):
        raise SpecError([Problem("spec.source", f"{store.uri} holds no kontinue predictor ({METADATA} missing)")])
    names = list(json.loads(store.read_text(METADATA))["columns"])  # the models it built
    available = [name for name in names if family_of(name) is not None and family_of(name).dumped]
    missing = [name for name in spec.backbones or () if name not in available]
    if missing:
        raise SpecError([Problem("spec.backbones", f"the source {store.uri} has no {', '.join(missing)} "
                                 f"backbone; it has {', '.join(available)}")])
    replaced = spec.model.backbones() if spec.model else []
    taken = [name for name in spec.backbones or available if name not in replaced]
    status = json.loads(store.read_text(STATUS)) if store.exists(STATUS) else {}
    if status.get("dumpedModel"):
        dumps = {name: _on_this_machine(store, scratch / "source-dump" / name, f"dump/{name}") for name in taken}
        return store.child("dump").uri, {name: str(path) for name, path in dumps.items()}
    source = Predictor.load(_on_this_machine(store, scratch / "source"))
    dump = Path(source.dump_model(scratch / "source-dump"))
    return dump.as_uri(), {name: str(dump / name) for name in taken}


def _new_predictor(spec: TrainingRunSpec | TransferRunSpec, run_dir: RunDirectory, run_dir_uri: str,
                   scratch: Path) -> Predictor:
    """What a run's first attempt trains: a TrainingRun's new model or continueFrom predictor, or a
    new model on a TransferRun's source backbones."""
    if isinstance(spec, TrainingRunSpec) and spec.continue_from:
        return _continue_from(spec.continue_from, run_dir_uri, scratch)
    context = {}
    if isinstance(spec, TransferRunSpec):
        dump_uri, context["source_dumps"] = _source_dumps(spec, run_dir_uri, scratch)
        if not process_rank():
            run_dir.update_status(sourceDumpUri=dump_uri)
    return Predictor(label=spec.task.label, problem_type=spec.task.problem_type, eval_metric=spec.task.eval_metric,
                     hyperparameters=spec.effective_hyperparameters(**context))


def report_to_stdout(status: dict[str, Any]) -> None:
    """The status line the operator reads from the pod's log."""
    print(status_line(status), flush=True)


def _continues(spec: TrainingRunSpec | TransferRunSpec) -> bool:
    """A continueFrom predictor keeps its own hyperparameters unless the spec overrides them."""
    return isinstance(spec, TrainingRunSpec) and spec.continue_from is not None


def run_training(run: TrainingRun | TransferRun, run_dir_uri: str, *, scratch: str | os.PathLike | None = None,
                 progress_bar: bool = False, report: Callable[[dict[str, Any]], None] | None = None) -> Outcome:
    """One attempt at `run`, in `run_dir_uri`; returns how it ended. `report` gets status.json
    after every write. The run's uid and attempt number come from the trainer pod's environment
    (RUN_UID_ENV, ATTEMPT_ENV); without them only the spec is checked against the directory."""
    scratch = Path(scratch or tempfile.mkdtemp(prefix="kontinue-"))
    if process_rank():  # another rank of a DDP fit (the same command again): its own copies of remote files
        scratch = scratch / f"rank-{process_rank()}"
    run_dir = open_run_directory(run_dir_uri, scratch / "run")
    run_dir.report = report
    try:
        run_dir.claim(Claimant.of(run))
        return _run_attempt(run, run_dir, run_dir_uri, scratch, progress_bar)
    except Superseded as stop:
        return _superseded(run_dir, stop.message)


def _superseded(run_dir: RunDirectory, message: str) -> Outcome:
    log.error("%s", message)
    return Outcome(result="superseded", run_dir=run_dir.uri, step=run_dir.status.get("step"), message=message)


def _run_attempt(run: TrainingRun | TransferRun, run_dir: RunDirectory, run_dir_uri: str, scratch: Path,
                 progress_bar: bool) -> Outcome:
    spec = run.spec
    state = run_dir.state()
    if state == COMPLETED:
        log.info("run %s is trained; finishing what is left of it", run_dir.uri)
        run_dir.drop_resume_points()  # whatever a stop while they were being deleted left
        return _last_steps(spec, run_dir, lambda: Predictor.load(run_dir.path, run_dir=run_dir))
    train = read_table(spec.data.train)
    validation = read_table(spec.data.validation) if spec.data.validation else None
    if state == RESUMABLE:
        predictor = Predictor.load(run_dir.path, resume=True, run_dir=run_dir)
        predictor.enable_progress_bar = progress_bar
    else:
        predictor = _new_predictor(spec, run_dir, run_dir_uri, scratch)
        predictor.enable_progress_bar = progress_bar
        predictor.use_run_directory(run_dir)
    try:
        predictor.fit(train, validation, time_limit=spec.time_limit_seconds(), seed=spec.seed,
                      column_types=spec.task.column_types or None,
                      hyperparameters=spec.effective_hyperparameters() if _continues(spec) else None)
    except Preempted as stop:
        if run_dir.ownership is not None and run_dir.ownership.superseded:  # found while stopping
            return _superseded(run_dir, run_dir.ownership.superseded)
        log.warning("stopped at step %d; the next attempt resumes there", stop.step)
        return _outcome(run_dir, "preempted", step=stop.step)
    if not predictor.is_main_process:  # another rank of a DDP fit: rank 0 scores, dumps and reports the run
        return _outcome(run_dir, "succeeded")
    return _last_steps(spec, run_dir, lambda: predictor)


def _last_steps(spec: TrainingRunSpec | TransferRunSpec, run_dir: RunDirectory,
                trained: Callable[[], Predictor]) -> Outcome:
    """After training: the test scores, then the dump, each recorded in status.json once done. A
    SIGTERM here stops the attempt between them (exit 75), and the next attempt does what is missing."""
    predictor: Predictor | None = None
    for step in ("test", "dump"):
        if STOP_REQUESTED.is_set():
            log.warning("stopped after training, before its %s; the next attempt finishes the run", step)
            return _outcome(run_dir, "preempted")
        if step == "test" and spec.data.test and run_dir.status.get("testMetrics") is None:
            predictor = predictor or trained()
            run_dir.update_status(testMetrics=predictor.evaluate(read_table(spec.data.test)))
        if step == "dump" and spec.dump_model and not run_dir.status.get("dumpedModel"):
            predictor = predictor or trained()
            run_dir.guard()  # the dump writes into the run directory without passing through RunDirectory
            predictor.dump_model()
    return _outcome(run_dir, "succeeded", test_scores=run_dir.status.get("testMetrics") or {})


def _outcome(run_dir: RunDirectory, result: str, **fields: Any) -> Outcome:
    status = run_dir.status
    return Outcome(result=result, run_dir=run_dir.uri, step=fields.pop("step", status.get("step")),
                   model=f"{run_dir.uri.rstrip('/')}/{BEST}" if result == "succeeded" else None,
                   checkpoint=status.get("lastCheckpoint") if result == "preempted" else None,
                   scores=status.get("metrics") or {}, dump=fields.pop("dump", status.get("dumpedModel")),
                   **fields)
