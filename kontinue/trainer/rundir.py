"""The run directory: one layout for a Predictor's path and a TrainingRun's storage.

    kontinue.json   predictor metadata (written before the first step)
    assets/<prefix>/  what rebuilding each backbone needs (tokenizer, config)
    last.ckpt       the resume point; previous.ckpt the one before it; each with a .sha256 beside it
    model.ckpt      the best weights so far
    status.json     phase, progress, last checkpoint, metrics, warnings
    dump/           dump_model output
    owner.json      which run, spec and attempt the directory belongs to (kontinue.trainer.ownership)

Training always happens in a local directory; when the run directory is remote (S3), every file
written locally is published there too, and `fetch` brings a run back onto a new machine.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from kontinue.storage import ChecksumMismatch, LocalStore, ObjectNotFound, Store, open_store
from kontinue.trainer.ownership import Claimant, Ownership, Superseded

log = logging.getLogger("kontinue.trainer")

METADATA, STATUS, LAST, PREVIOUS, BEST = "kontinue.json", "status.json", "last.ckpt", "previous.ckpt", "model.ckpt"
RESUME_POINTS = (LAST, PREVIOUS)
# What a run directory holds, decided in one place (RunDirectory.state):
EMPTY = "empty"            # no predictor
UNSTARTED = "unstarted"    # set up, stopped before its first resume point: nothing was trained
RESUMABLE = "resumable"    # a resume point was taken: continue from it (Predictor.load(resume=True))
COMPLETED = "completed"    # trained: model.ckpt holds the result


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunDirectory:
    def __init__(self, path: str | os.PathLike, remote: Store | None = None):
        self.path = Path(path).absolute()
        self.path.mkdir(parents=True, exist_ok=True)
        self.local = open_store(str(self.path))
        self.remote = remote
        self.status: dict[str, Any] = self._read_json(STATUS) or {}
        self.report: Callable[[dict[str, Any]], None] | None = None  # called after each status write
        self.ownership: Ownership | None = None  # set by claim(): every write is fenced from then on

    @property
    def uri(self) -> str:
        return (self.remote or self.local).uri

    def _read_json(self, name: str) -> dict[str, Any] | None:
        return json.loads(self.local.read_text(name)) if self.local.exists(name) else None

    def publish(self, name: str, *, checksum: bool = False) -> None:
        """Copies a local file to the remote run directory, if there is one."""
        if self.remote is not None:
            self.remote.put_file(name, self.path / name, checksum=checksum)

    def fetch(self) -> None:
        """Brings metadata, assets, status and the best model down from the remote run directory."""
        if self.remote is None:
            return
        for info in self.remote.list():
            if info.key not in RESUME_POINTS and not info.key.startswith("dump/"):
                self.remote.get_file(info.key, self.path / info.key)
        self.status = self._read_json(STATUS) or {}

    # -- ownership -------------------------------------------------------------------------------
    def claim(self, me: Claimant) -> None:
        """Takes the directory for this attempt before anything is written (kontinue.trainer.ownership):
        raises InvalidInput for another spec's directory, Superseded when a newer attempt holds it."""
        self.ownership = Ownership(self.remote or self.local, me)
        self.ownership.claim(claimable=self.state() in (EMPTY, UNSTARTED), time=now())

    def guard(self) -> None:
        """Raises Superseded if a newer attempt has claimed the directory; call before writing to it.
        A directory nobody claimed (a Predictor's path) is not fenced."""
        if self.ownership is not None:
            self.ownership.check()

    def _superseded(self) -> str | None:
        try:
            self.guard()
        except Superseded as stop:
            return stop.message
        return None

    # -- metadata ------------------------------------------------------------------------------
    def read_metadata(self) -> dict[str, Any] | None:
        return self._read_json(METADATA)

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        self.guard()
        self.local.write_text(METADATA, json.dumps(metadata, indent=2, default=str))
        self.publish(METADATA)
        if self.remote is not None:
            self.remote.sync_up(self.path / "assets", "assets")

    # -- status ----------------------------------------------------------------------------------
    def update_status(self, *, step: int | None = None, max_steps: int | None = None, **fields: Any) -> None:
        if step is not None:
            self.status["step"] = step
            if max_steps:
                self.status["progress"] = round(min(1.0, step / max_steps), 4)
        self.status.update({k: v for k, v in fields.items() if v is not None}, updated=now())
        self.guard()
        self.local.write_text(STATUS, json.dumps(self.status, indent=2, default=str))
        self.publish(STATUS)
        if self.report is not None:
            self.report(self.status)

    def warn(self, message: str) -> None:
        log.warning(message)
        self.status.setdefault("warnings", []).append({"time": now(), "message": message})
        self.update_status()

    # -- checkpoints -----------------------------------------------------------------------------
    def _scratch(self, name: str) -> Path:
        """A hidden temporary beside the store's files: never listed, never published."""
        return self.path / f".{name}.{os.getpid()}.tmp"

    def save_resume_point(self, trainer) -> None:
        """Writes last.ckpt (the previous one kept as previous.ckpt) here and remotely.

        Every process takes part (Lightning gathers the state), rank 0 writes the files, and all
        wait for it so none runs ahead into the next collective. Rank 0's ownership check, made
        once the checkpoint is serialized (the shortest window before the files are replaced), is
        shared, so that a superseded attempt stops in every process.
        """
        scratch = self._scratch(LAST)
        trainer.save_checkpoint(scratch, weights_only=False)
        superseded = trainer.strategy.broadcast(self._superseded() if trainer.is_global_zero else None, src=0)
        if superseded:
            scratch.unlink(missing_ok=True)
            raise Superseded(superseded)
        if trainer.is_global_zero:
            try:
                for store in filter(None, (self.local, self.remote)):
                    if store.exists(LAST):
                        store.move(LAST, PREVIOUS)
                info = self.local.adopt(LAST, scratch, checksum=True)
                self.publish(LAST, checksum=True)
            finally:
                scratch.unlink(missing_ok=True)
            record = {"uri": f"{self.uri.rstrip('/')}/{LAST}", "step": trainer.global_step,
                      "epoch": trainer.current_epoch, "sha256": info.sha256, "time": now()}
            self.update_status(step=trainer.global_step, lastCheckpoint=record)
            log.info("resume point saved at step %d (%s)", trainer.global_step, record["uri"])
        trainer.strategy.barrier("kontinue-resume-point")

    def save_best_model(self, trainer, module: torch.nn.Module, score: float) -> None:
        if not trainer.is_global_zero:
            return
        scratch = self._scratch(BEST)
        torch.save({"state_dict": module.state_dict(), "score": score, "step": trainer.global_step,
                    "metrics": dict(module.last_validation)}, scratch)
        try:
            self.guard()
            self.local.adopt(BEST, scratch, checksum=True)
            self.publish(BEST, checksum=True)
        finally:
            scratch.unlink(missing_ok=True)
        self.update_status(bestCheckpoint={"uri": f"{self.uri.rstrip('/')}/{BEST}", "score": score,
                                           "step": trainer.global_step})

    def load_best_model(self) -> dict[str, Any]:
        return torch.load(self.path / BEST, map_location="cpu", weights_only=True)

    def has_best_model(self) -> bool:
        return self.local.exists(BEST)

    def find_resume_point(self) -> Path | None:
        """The newest checkpoint that matches its sha256 and loads; bad ones are skipped loudly.

        Storage that cannot be reached is an error, not a bad checkpoint: the attempt fails and
        is retried rather than falling back to an older state.
        """
        for name in RESUME_POINTS:
            try:
                if self.remote is not None:
                    self.remote.get_file(name, self.path / name, verify=True)
                elif self.local.exists(name):
                    self.local.verify(name)
                else:
                    continue
            except ObjectNotFound:
                continue
            except ChecksumMismatch as error:
                self.warn(f"skipping checkpoint {name}: {error}")
                continue
            try:
                torch.load(self.path / name, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # truncated, not a checkpoint, or holding more than tensors
                self.warn(f"skipping checkpoint {name}: it does not load ({type(error).__name__}: {error})")
                continue
            return self.path / name
        return None

    def state(self) -> str:
        if self.read_metadata() is None:
            return EMPTY
        if self.has_resume_point() or (self.status.get("lastCheckpoint") and self.status.get("phase") != "Succeeded"):
            return RESUMABLE  # with its checkpoints lost, resuming fails loudly rather than starting over
        if self.status.get("phase") == "Succeeded" or self.has_best_model():
            return COMPLETED
        return UNSTARTED

    def has_resume_point(self) -> bool:
        stores = [self.remote] if self.remote is not None else [self.local]
        return any(store.exists(name) for store in stores for name in RESUME_POINTS)

    def drop_resume_points(self) -> None:
        """A finished run keeps model.ckpt only, as AutoMM does."""
        self.guard()
        self.status.pop("lastCheckpoint", None)
        for store in filter(None, (self.local, self.remote)):
            for name in RESUME_POINTS:
                store.delete(name)


def open_run_directory(uri: str, scratch: str | os.PathLike | None = None) -> RunDirectory:
    """A local URI is trained in place; a remote one through a local scratch directory."""
    store = open_store(uri)
    if isinstance(store, LocalStore):
        return RunDirectory(store.root)
    if scratch is None:
        raise ValueError(f"{uri}: a remote run directory needs a local scratch directory")
    run_dir = RunDirectory(scratch, remote=store)
    run_dir.fetch()
    return run_dir
