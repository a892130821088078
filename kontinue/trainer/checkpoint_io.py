"""Checkpoints written in the background: the training loop waits only for a copy of the state.

`ResumePointIO` is the Lightning `CheckpointIO` plugin through which `Trainer.save_checkpoint`
hands over a resume point: it copies every tensor into shared memory (a `Snapshot`) while the loop
waits, then a `BackgroundWriter` has the copy serialised, hashed and stored (by the helper process
of kontinue.trainer.serializer) while training goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins import CheckpointIO

from kontinue.trainer.serializer import SerializerProcess, Snapshot, WriteCancelled

if TYPE_CHECKING:
    from kontinue.trainer.rundir import RunDirectory

log = logging.getLogger("kontinue.trainer")


@dataclass
class _Job:
    write: Callable[[], None]
    what: str
    supersedable: bool
    cancel: Callable[[], None] | None  # stops the write in progress (a resume point's)


class BackgroundWriter:
    """One thread that runs writes in the order they were asked for, one at a time.

    A resume point still waiting when a newer one is asked for is dropped: only the newest state
    matters, and at most two snapshots are held (the one being written, the one waiting). Once
    training stopped, the resume point being written is cancelled too: the final one supersedes it.
    Other writes (the best model) are never dropped. The first failure is kept and raised in the training
    thread by `check` or `flush`; nothing is written after it.
    """

    def __init__(self, serializer: SerializerProcess | None = None) -> None:
        self.serializer = serializer or SerializerProcess.shared()
        self._stopping = False
        self._jobs: deque[_Job] = deque()
        self._busy: _Job | None = None  # the write in progress
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def snapshot(self, value: Any) -> Snapshot:
        """A copy of `value` that training can no longer change, for a write submitted here."""
        return Snapshot(value, None if self._stopping else self.serializer)

    def training_stopped(self) -> None:
        """Before the final resume point is taken: it should be durable as soon as possible. So the
        resume point being written is cancelled (on a busy machine the helper's low priority would
        hold the stop up), and snapshots taken from now on are written by this writer's thread at
        the trainer's priority (the helper's lower one only leaves training the CPU)."""
        with self._changed:
            self._stopping = True
            if self._busy is not None and self._busy.cancel is not None:
                log.info("%s is cancelled: the final resume point supersedes it", self._busy.what)
                self._busy.cancel()

    def submit(self, write: Callable[[], None], what: str, *, supersedable: bool = False,
               cancel: Callable[[], None] | None = None) -> None:
        self.check()
        with self._changed:
            if supersedable:
                for job in [job for job in self._jobs if job.supersedable]:
                    self._jobs.remove(job)
                    log.info("%s superseded by %s before it was written", job.what, what)
            self._jobs.append(_Job(write, what, supersedable, cancel))
            self._changed.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kontinue-checkpoint-writer", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                if not self._jobs or self._error is not None:
                    self._jobs.clear()
                    self._thread = None
                    self._changed.notify_all()
                    return
                job = self._busy = self._jobs.popleft()
            try:
                job.write()
            except WriteCancelled:
                pass  # by training_stopped, which logged it
            except BaseException as error:  # noqa: BLE001 -- raised in the training thread
                log.error("writing %s failed: %s: %s", job.what, type(error).__name__, error)
                self._error = error
            finally:
                # The snapshot is freed here, in this thread, before anyone is told the writer is
                # idle: freed later, it could still be freeing tensors when the interpreter shuts
                # down, which aborts the process (exit -6 instead of 75).
                job = None
                with self._changed:
                    self._busy = None
                    self._changed.notify_all()

    @property
    def error(self) -> BaseException | None:
        return self._error

    def check(self) -> None:
        """Raises the failure of an earlier write, if there was one."""
        if self._error is not None:
            raise self._error

    def flush(self, *, raise_error: bool = True) -> None:
        """Waits until every write asked for is durable (or abandoned after a failure); raises the
        first failure unless told not to (when another exception is already ending the fit)."""
        with self._changed:
            thread = self._thread
            if thread is not None:
                log.info("waiting for %s being written", ", ".join(job.what for job in [self._busy, *self._jobs] if job))
            self._changed.wait_for(lambda: self._thread is None)
        if thread is not None:
            thread.join()  # gone entirely before the process may exit
        if raise_error:
            self.check()


class ResumePointIO(CheckpointIO):
    """Lightning's checkpoint I/O for a run directory's resume points (passed to the Trainer as a
    plugin). Saving returns once the state is copied; loading never unpickles anything but tensors
    and plain types."""

    def __init__(self, run_dir: "RunDirectory", writer: BackgroundWriter):
        self.run_dir, self.writer = run_dir, writer

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        state, key = self.writer.snapshot(checkpoint), str(path)
        self.writer.submit(lambda: self.run_dir.write_resume_point(state, key), f"resume point {key}",
                           supersedable=True, cancel=state.cancel)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)

    def remove_checkpoint(self, path) -> None:
        raise NotImplementedError("resume points are removed by RunDirectory once the pointer has moved on")

    def teardown(self) -> None:
        self.writer.flush(raise_error=False)  # ResumePoints raises a failure where the fit can still report it
