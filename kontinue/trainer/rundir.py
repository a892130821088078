"""The run directory: one layout for a Predictor's path and a TrainingRun's storage.

    kontinue.json   predictor metadata (written before the first step)
    assets/<prefix>/  what rebuilding each backbone needs (tokenizer, config)
    checkpoints/step-000000120.ckpt  resume points, each written once and never changed, with a
                    .sha256 beside it
    last.json       the pointer: the newest durable resume points, newest first, with their sha256;
                    written last and atomically, so it only ever names complete checkpoints
    candidates/step-000000120.ckpt  the top_k validated states (+ .sha256), averaged into model.ckpt
                    when training ends; every resume point names those it keeps
    model.ckpt      the best weights so far (+ .sha256), the average of the candidates once trained
    status.json     phase, progress, last checkpoint, metrics, warnings
    dump/           dump_model output
    owner.json      which run, spec and attempt the directory belongs to (kontinue.trainer.ownership)

Training always happens in a local directory; when the run directory is remote (S3), every file
written locally is published there too, and `fetch` brings a run back onto a new machine. Resume
points are streamed to the run directory itself (S3 or the local one) from their serializer.

Runs started before resume points were immutable have last.ckpt and previous.ckpt instead of
checkpoints/ and last.json; they are still resumed from (LEGACY_RESUME_POINTS).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from kontinue.api.reports import dumps, loads
from kontinue.storage import ChecksumMismatch, LocalStore, ObjectNotFound, Store, open_store
from kontinue.trainer.ownership import Claimant, Ownership, Superseded
from kontinue.trainer.serializer import write_checkpoint

log = logging.getLogger("kontinue.trainer")

METADATA, STATUS, POINTER, BEST = "kontinue.json", "status.json", "last.json", "model.ckpt"
CHECKPOINTS = "checkpoints/"
CANDIDATES = "candidates/"  # the best validated states, averaged into model.ckpt at the end (optim.top_k)
CANDIDATES_FIELD = "candidates"  # in a resume point: the candidates kept at that step, best first
LEGACY_RESUME_POINTS = ("last.ckpt", "previous.ckpt")  # read, never written
DEFAULT_KEEP = 2
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
        self.status: dict[str, Any] = self._read_status()
        self.report: Callable[[dict[str, Any]], None] | None = None  # called after each status write
        self.ownership: Ownership | None = None  # set by claim(): every write is fenced from then on
        self.keep = DEFAULT_KEEP  # resume points kept (env.checkpoint_keep)
        self._status_lock = threading.Lock()  # the checkpoint writer's thread reports too
        self._points: list[dict[str, Any]] | None = None  # what last.json names, once read
        self._issued: set[str] = set()  # resume point keys handed out by this process

    @property
    def store(self) -> Store:
        """Where the run directory's files live: the remote store, or the local directory."""
        return self.remote or self.local

    @property
    def uri(self) -> str:
        return self.store.uri

    def _read_json(self, name: str) -> dict[str, Any] | None:
        return json.loads(self.local.read_text(name)) if self.local.exists(name) else None

    def _read_status(self) -> dict[str, Any]:
        """status.json, its "NaN"/"Infinity" metrics as floats again (kontinue.api.reports)."""
        return loads(self.local.read_text(STATUS)) if self.local.exists(STATUS) else {}

    def publish(self, name: str, *, checksum: bool = False) -> None:
        """Copies a local file to the remote run directory, if there is one."""
        if self.remote is not None:
            self.remote.put_file(name, self.path / name, checksum=checksum)

    def fetch(self) -> None:
        """Brings metadata, assets, status and the best model down from the remote run directory,
        each file with a recorded sha256 verified against it. The remote directory is the truth: what
        the scratch directory holds beyond it (left there by another run or an earlier attempt) goes."""
        if self.remote is None:
            return
        remote = {info.key: info for info in self.remote.list()}
        for info in self.local.list():
            if info.key not in remote:
                self.local.delete(info.key)
        for info in remote.values():
            if not _resume_point_file(info.key) and not info.key.startswith("dump/"):
                self.remote.get_file(info.key, self.path / info.key, verify=info.sha256 is not None)
        self.status = self._read_status()

    # -- ownership -------------------------------------------------------------------------------
    def claim(self, me: Claimant) -> None:
        """Takes the directory for this attempt before anything is written (kontinue.trainer.ownership):
        raises InvalidInput for another spec's directory, Superseded when a newer attempt holds it."""
        self.ownership = Ownership(self.store, me)
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
        with self._status_lock:
            self.status.update({k: v for k, v in fields.items() if v is not None}, updated=now())
            self.guard()
            self.local.write_text(STATUS, dumps(self.status, indent=2, default=str))
            self.publish(STATUS)
            if self.report is not None:
                self.report(self.status)

    def warn(self, message: str) -> None:
        log.warning(message)
        self.status.setdefault("warnings", []).append({"time": now(), "message": message})
        self.update_status()

    # -- resume points ---------------------------------------------------------------------------
    def resume_point_key(self, step: int) -> str:
        """A key no other resume point has: the step, and the attempt that writes it, so a stale
        attempt can never overwrite one a newer attempt named (a second point at the same step
        gets a counter). An object is written once and never changed."""
        named = {point["key"] for point in self._read_points()}
        base = self._step_key(CHECKPOINTS, step)
        key, n = f"{base}.ckpt", 0
        while key in named or key in self._issued:
            n += 1
            key = f"{base}-{n}.ckpt"
        self._issued.add(key)
        return key

    def _step_key(self, folder: str, step: int) -> str:
        attempt = self.ownership.me.attempt if self.ownership is not None else None
        return f"{folder}step-{step:09d}" + (f"-a{attempt}" if attempt is not None else "")

    def write_resume_point(self, checkpoint: dict[str, Any], key: str) -> dict[str, Any]:
        """The save protocol (run in the background writer, kontinue.trainer.checkpoint_io):
        1. the checkpoint is streamed from its serializer into an immutable object + its sha256;
        2. last.json is replaced, in one atomic write, to name it first and its predecessors after;
        3. status.json's lastCheckpoint names it;
        4. resume points last.json no longer names are deleted.
        A crash at any step leaves last.json on complete, verified checkpoints. Each write is fenced:
        a superseded attempt stops before it."""
        store = self.store
        self.guard()
        info = write_checkpoint(store, key, checkpoint)
        point = {"key": key, "step": checkpoint["global_step"], "epoch": checkpoint["epoch"],
                 "sha256": info.sha256, "size": info.size, "time": now(),
                 "candidates": [candidate["key"] for candidate in checkpoint.get(CANDIDATES_FIELD, [])]}
        points = [point, *(p for p in self._read_points() if p["key"] != key)][:max(1, self.keep)]
        self.guard()
        store.write_text(POINTER, json.dumps({"version": 1, "points": points}, indent=2))
        self._points = points
        self.update_status(lastCheckpoint={"uri": f"{self.uri.rstrip('/')}/{key}",
                                           **{name: point[name] for name in ("step", "epoch", "sha256", "time")}})
        log.info("resume point saved at step %d (%s)", point["step"], key)
        self._delete_resume_points(keep={p["key"] for p in points})
        return point

    def _read_points(self) -> list[dict[str, Any]]:
        """The resume points last.json names, newest first ([] when there is none)."""
        if self._points is None:
            try:
                pointer = json.loads(self.store.read_text(POINTER))
                points = pointer["points"]
                if not all(isinstance(p, dict) and isinstance(p.get("key"), str) for p in points):
                    raise ValueError("an entry without a key")
            except ObjectNotFound:
                points = []
            except (ValueError, KeyError, TypeError) as error:
                self.warn(f"{POINTER} is unreadable ({type(error).__name__}: {error}); "
                          f"looking for resume points in {CHECKPOINTS} instead")
                points = self._listed_points()
            self._points = points
        return self._points

    def _listed_points(self) -> list[dict[str, Any]]:
        """Resume points found by listing, newest first: for a pointer that cannot be read."""
        found = [{"key": info.key, "sha256": info.sha256} for info in self.store.list(CHECKPOINTS)
                 if info.key.endswith(".ckpt")]
        return sorted(found, key=lambda point: point["key"], reverse=True)

    def _delete_resume_points(self, keep: set[str]) -> None:
        """Deletes the resume points not in `keep`, and the model candidates none of the kept ones
        needs (a candidate written after the newest point cannot be there yet: the writer writes
        in order, and this runs in the writer after that point). Objects of a newer attempt are
        never touched: a stale attempt, stopped anywhere in here and going on later, deletes only
        its own and older attempts' leftovers."""
        self.guard()
        needed = {key for point in self._read_points() for key in point.get("candidates", [])}
        mine = self.ownership.me.attempt if self.ownership is not None else None
        for folder, kept in ((CHECKPOINTS, keep), (CANDIDATES, needed)):
            for info in self.store.list(folder):
                written_by = _attempt_of(info.key)
                if info.key not in kept and (mine is None or written_by is None or written_by <= mine):
                    self.store.delete(info.key)
            self.store.remove_interrupted_writes(folder)
        for name in LEGACY_RESUME_POINTS:
            self.store.delete(name)

    def find_resume_point(self) -> Path | None:
        """The newest resume point that matches its sha256 and loads, as a local file; bad ones are
        skipped with a warning, falling back to their predecessors (and last.ckpt/previous.ckpt of
        a run directory from before last.json).

        Storage that cannot be reached is an error, not a bad checkpoint: the attempt fails and
        is retried rather than falling back to an older state.
        """
        candidates = self._read_points() + [{"key": name, "legacy": True} for name in LEGACY_RESUME_POINTS]
        for point in candidates:
            name, path = point["key"], self.path / point["key"]
            try:
                if self.remote is not None:
                    self.remote.get_file(name, path, verify=True, sha256=point.get("sha256"))
                else:
                    self.local.verify(name, sha256=point.get("sha256"))
            except ObjectNotFound:
                if not point.get("legacy"):
                    self.warn(f"skipping checkpoint {name}: {POINTER} names it but it is gone")
                continue
            except ChecksumMismatch as error:
                self.warn(f"skipping checkpoint {name}: {error}")
                continue
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # truncated, not a checkpoint, or holding more than tensors
                self.warn(f"skipping checkpoint {name}: it does not load ({type(error).__name__}: {error})")
                continue
            return path
        return None

    def has_resume_point(self) -> bool:
        return any(self.store.exists(name) for name in (POINTER, *LEGACY_RESUME_POINTS))

    def drop_resume_points(self) -> None:
        """A finished run keeps model.ckpt only, as AutoMM does. The pointer goes first: a run
        directory never names a deleted checkpoint."""
        self.guard()
        with self._status_lock:
            self.status.pop("lastCheckpoint", None)
        self.store.delete(POINTER)
        self._points = []
        self._delete_resume_points(keep=set())
        if self.remote is not None:  # what resuming downloaded into the scratch directory
            for folder in (CHECKPOINTS, CANDIDATES):
                self.local.child(folder.rstrip("/")).delete_all()
            for name in LEGACY_RESUME_POINTS:
                self.local.delete(name)

    # -- model candidates (optim.top_k) ---------------------------------------------------------
    def candidate_key(self, step: int) -> str:
        """The key of the candidate validated at `step` by this attempt (written once, never changed)."""
        return self._step_key(CANDIDATES, step) + ".ckpt"

    def write_candidate(self, key: str, candidate: dict[str, Any]) -> None:
        """A candidate for model.ckpt ({state_dict, score, step}), streamed to the run directory with
        its sha256; resume points that keep it as a candidate name it (CANDIDATES_FIELD)."""
        self.guard()
        write_checkpoint(self.store, key, candidate)

    def fetch_candidate(self, key: str) -> Path:
        """A candidate as a local file, verified against its sha256; raises ObjectNotFound or
        ChecksumMismatch."""
        if self.remote is not None:
            self.remote.get_file(key, self.path / key, verify=True)
        else:
            self.local.verify(key)
        return self.path / key

    # -- the best model --------------------------------------------------------------------------
    def write_best_model(self, best: dict[str, Any]) -> None:
        """model.ckpt ({state_dict, score, step, metrics}), streamed from its serializer into this
        machine's run directory, then published; status.json names it once it is durable."""
        self.guard()
        write_checkpoint(self.local, BEST, best)
        self.publish(BEST, checksum=True)
        self.update_status(bestCheckpoint={"uri": f"{self.uri.rstrip('/')}/{BEST}", "score": best["score"],
                                           "step": best["step"]})

    def load_best_model(self) -> dict[str, Any]:
        """model.ckpt, verified against its sha256 when one was recorded."""
        if self.local.sha256_of(BEST) is not None:
            self.local.verify(BEST)
        return torch.load(self.path / BEST, map_location="cpu", weights_only=True)

    def has_best_model(self) -> bool:
        return self.local.exists(BEST)

    def state(self) -> str:
        if self.read_metadata() is None:
            return EMPTY
        if self.status.get("finalState"):
            return COMPLETED  # trained; whatever of its last steps is missing is done again
        if self.has_resume_point() or (self.status.get("lastCheckpoint") and self.status.get("phase") != "Succeeded"):
            return RESUMABLE  # with its checkpoints lost, resuming fails loudly rather than starting over
        if self.status.get("phase") == "Succeeded" or self.has_best_model():
            return COMPLETED
        return UNSTARTED


def _attempt_of(key: str) -> int | None:
    """The attempt whose key this is (step-000000012-a2.ckpt, step-000000012-a2-1.ckpt: 2)."""
    found = re.search(r"-a(\d+)(?:-\d+)?\.ckpt$", key)
    return int(found.group(1)) if found else None


def _resume_point_file(key: str) -> bool:
    return key.startswith((CHECKPOINTS, CANDIDATES)) or key in (POINTER, *LEGACY_RESUME_POINTS)


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
