"""Checkpoints serialised, hashed and stored by a helper process at a lower CPU priority.

Writing a checkpoint in a thread of the training process hides the wait but not the CPU it needs
(torch.save, sha256, an upload's signing and copying: several CPU-seconds for a few hundred MB),
and that thread holds the GIL the training loop needs. So a `Snapshot` copies every tensor into one
shared-memory buffer (a memfd: /dev/shm is only 64 MiB in a default pod) while the loop waits, and
a `SerializerProcess`, a helper process started once (`serve`), maps that buffer, streams
torch.save into the store and reports the object's size and sha256. The helper imports at the
trainer's priority, then runs NICENESS below it: training keeps the CPU, the helper gets what
training leaves. It ignores SIGTERM and SIGINT (the trainer decides when to stop) and exits when the
trainer's end of its socket closes or the trainer is gone. Snapshots under MIN_HELPER_BYTES, and
those a stopping trainer takes, are written by the trainer's writer thread instead.

A write in progress can be cancelled (`Snapshot.cancel`: a stopping trainer's final resume point
supersedes the one being written): it stops at the next chunk torch.save hands over, before the
object is stored, and raises `WriteCancelled`; a write already done stays done.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import mmap
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

import torch

from kontinue.api.contract import InvalidInput
from kontinue.storage import ObjectInfo, StorageError, Store
from kontinue.storage.buffers import SpareBuffers

log = logging.getLogger("kontinue.trainer")

NICENESS = 10  # CFS weight 110 against training's 1024: about a tenth of a busy core
ALIGN = 64  # every tensor starts at a multiple of this in the buffer
READY = b"ready"  # what the helper says once it can take writes
CANCEL = b"cancel"  # what the trainer says to stop the helper's write in progress
# Smaller snapshots are written by the trainer's writer thread: they cost little CPU there, and at
# the helper's lower priority they would only become durable later on a busy machine.
MIN_HELPER_BYTES = 128 << 20
START_SECONDS = 60  # how long a write waits for a helper still importing torch
MIN_HELPER_BYTES_ENV = "KONTINUE_SERIALIZER_MIN_BYTES"  # overrides it: 0 sends every checkpoint to the helper
SPARE_BUFFERS = 2  # snapshot buffers kept mapped for the next snapshot of the same size (a resume point, the best model)


def min_helper_bytes() -> int:
    """The size from which snapshots go to the helper: MIN_HELPER_BYTES_ENV when it is set."""
    value = os.environ.get(MIN_HELPER_BYTES_ENV)
    if value is None:
        return MIN_HELPER_BYTES
    try:
        size = int(value)
    except ValueError:
        size = -1
    if size < 0:
        raise InvalidInput(MIN_HELPER_BYTES_ENV, f"must be a whole number of bytes (0 or more), not {value!r}")
    return size


class WriteCancelled(Exception):
    """A checkpoint write stopped before its object was stored: a newer one supersedes it."""


class _Cancellable:
    """The stream torch.save writes a checkpoint into, which refuses the next chunk once
    `cancelled()` (the object is stored only after the last one). torch.save reports the refusal as
    a RuntimeError of its own; `stopped` tells it apart from a failure."""

    def __init__(self, out, cancelled: Callable[[], bool]):
        self._out, self._cancelled = out, cancelled
        self.stopped = False

    def write(self, data: bytes) -> int:
        if self.stopped or self._cancelled():
            self.stopped = True
            raise WriteCancelled("the write was cancelled")
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


@dataclass(frozen=True)
class _TensorAt:
    """Where a tensor lies in a snapshot's buffer (the placeholder pickled in its place)."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _replace_tensors(value: Any, place) -> Any:
    """`value` with every tensor in its dicts, lists and tuples replaced by `place(tensor)`; other
    values deep-copied, so training can no longer change what is written."""
    if isinstance(value, torch.Tensor):
        return place(value)
    if isinstance(value, dict):
        return type(value)((key, _replace_tensors(item, place)) for key, item in value.items())
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_replace_tensors(item, place) for item in value)
    return copy.deepcopy(value)


def _restore_tensors(value: Any, tensor_at) -> Any:
    if isinstance(value, _TensorAt):
        return tensor_at(value)
    if isinstance(value, dict):
        return type(value)((key, _restore_tensors(item, tensor_at)) for key, item in value.items())
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_restore_tensors(item, tensor_at) for item in value)
    return value


def _views(buffer: mmap.mmap, value: Any) -> Any:
    """The tree with each placeholder turned into a tensor viewing its bytes in `buffer` (each with
    a storage of its own, so torch.save writes it as its own record)."""
    def tensor_at(at: _TensorAt) -> torch.Tensor:
        count = int(torch.Size(at.shape).numel())
        if count == 0:
            return torch.empty(at.shape, dtype=at.dtype)
        return torch.frombuffer(buffer, dtype=at.dtype, count=count, offset=at.offset).view(at.shape)
    return _restore_tensors(value, tensor_at)


class _SharedMemory:
    """A memfd, through which the helper maps the same pages, and this process's mapping of it."""

    def __init__(self, size: int):
        self.fd = os.memfd_create("kontinue-snapshot", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mapping = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def __len__(self) -> int:
        return len(self.mapping)

    def close(self) -> None:
        try:
            self.mapping.close()
        finally:
            os.close(self.fd)


# The loop waits while a snapshot is copied, and into a fresh memfd that copy also allocates and
# zeroes every page it first touches: 0.16 s for MiniLM's 271 MB resume point, against 0.02 s into
# pages mapped already. So between points this process keeps about one resume point's and one best
# model's size of shared memory, which each point needs again anyway.
_SPARES = SpareBuffers(SPARE_BUFFERS, _SharedMemory)


class Snapshot:
    """A copy of a checkpoint that training can no longer change: its tensors in a shared-memory
    buffer, everything else in `tree`, where plain fields stay readable (``snapshot["global_step"]``).
    `write` stores it through `serializer`, or in the calling thread without one."""

    def __init__(self, value: Any, serializer: SerializerProcess | None = None):
        self.serializer, self._memory = serializer, None
        self._cancelled = threading.Event()
        tensors: list[tuple[_TensorAt, torch.Tensor]] = []
        size = 0

        def place(tensor: torch.Tensor) -> _TensorAt:
            nonlocal size
            tensor = tensor.detach()
            at = _TensorAt(size, tensor.dtype, tuple(tensor.shape))
            tensors.append((at, tensor))
            size += -(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN
            return at

        self.tree = _replace_tensors(value, place)
        self.size = size
        if size:
            self._memory = _SPARES.take(size)
            flat = torch.frombuffer(self._memory.mapping, dtype=torch.uint8)
            for at, tensor in tensors:
                nbytes = tensor.numel() * tensor.element_size()
                if nbytes:
                    flat[at.offset:at.offset + nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor)
            del flat

    @property
    def fd(self) -> int:
        """The memfd holding the tensors (-1 once closed, or with no tensors)."""
        return self._memory.fd if self._memory is not None else -1

    def __getitem__(self, key: str) -> Any:
        return self.tree[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.tree.get(key, default)

    def write(self, store: Store, key: str) -> ObjectInfo:
        """Serialises the snapshot into `key` of `store` with its sha256: in the serializer's
        process, or in this thread without one or while it starts. Raises WriteCancelled once
        `cancel` was called, unless the object was stored by then."""
        if (self.serializer is not None and self.size >= self.serializer.min_bytes
                and (info := self.serializer.write(store, key, self)) is not None):
            return info
        return _write(store, key, self.tree, self.fd, self.size, self._cancelled.is_set)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stops its write, wherever it runs, before the object is stored (safe from any thread)."""
        self._cancelled.set()
        if self.serializer is not None:
            self.serializer.cancel(self)

    def close(self) -> None:
        """Gives the buffer back for the next snapshot (once no write reads it: the helper replied)."""
        if self._memory is not None:
            _SPARES.give_back(self._memory)
            self._memory = None

    def __del__(self) -> None:
        self.close()


def write_checkpoint(store: Store, key: str, checkpoint: Any,
                     cancelled: Callable[[], bool] | None = None) -> ObjectInfo:
    """`checkpoint` (a Snapshot, or a state of tensors and plain values) streamed from torch.save
    into `key` of `store`, with its sha256; stopped with WriteCancelled once `cancelled()`."""
    if isinstance(checkpoint, Snapshot):
        return checkpoint.write(store, key)
    with store.writer(key, checksum=True) as out:
        stream = _Cancellable(out, cancelled or (lambda: False))
        try:
            torch.save(checkpoint, stream)
        except Exception:
            if stream.stopped:
                raise WriteCancelled(f"{store.uri}/{key}: the write was cancelled") from None
            raise
    return out.info


def _write(store: Store, key: str, tree: Any, fd: int, size: int, cancelled: Callable[[], bool]) -> ObjectInfo:
    buffer = mmap.mmap(fd, size) if size else None
    state = _views(buffer, tree)
    info = write_checkpoint(store, key, state, cancelled)
    del state  # the views, before the mapping goes
    if buffer is not None:
        with contextlib.suppress(BufferError):  # a view still held: unmapped once it goes
            buffer.close()
    return info


class SerializerProcess:
    """The helper process, started on first use and again after it died; one write at a time.
    `shared()` is the one every fit in this process uses (started once: it imports torch)."""

    _shared: SerializerProcess | None = None

    @classmethod
    def shared(cls) -> SerializerProcess:
        if cls._shared is None:
            cls._shared = cls(min_helper_bytes())
        return cls._shared

    def __init__(self, min_bytes: int = MIN_HELPER_BYTES) -> None:
        self.min_bytes = min_bytes  # snapshots smaller than this are written in the calling thread
        self._process: subprocess.Popen | None = None
        self._connection: Connection | None = None
        self._ready = False  # the helper has imported what it needs
        self._failed_to_start = False  # writes stay in the trainer's thread from then on
        self._lock = threading.Lock()  # one write at a time
        self._sending = threading.Lock()  # a write's request and a cancel never interleave
        self._in_flight: Snapshot | None = None  # the snapshot the helper is writing

    def start(self, *, wait: bool = False) -> None:
        """Starts the helper ahead of its first write (it takes seconds to import torch); with
        `wait`, returns once it can take writes."""
        with self._lock:
            self._running()
            if wait:
                self._check_ready(timeout=None)

    def _running(self) -> None:
        if not self._failed_to_start and (self._process is None or self._process.poll() is not None):
            self._start()

    def _start(self) -> None:
        self._stop()  # what is left of one that died
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [package_root, os.environ.get("PYTHONPATH")]))}  # this kontinue, installed or not
        with theirs:
            self._process = subprocess.Popen(  # stop signals ignored before the imports
                [sys.executable, "-c", f"import signal; [signal.signal(s, signal.SIG_IGN) for s in "
                                       f"(signal.SIGTERM, signal.SIGINT)]; "
                                       f"from kontinue.trainer.serializer import serve; serve({theirs.fileno()}, {os.getpid()})"],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=environ)
        self._connection = Connection(mine.detach())

    def _check_ready(self, timeout: float | None = 0) -> bool:
        """Whether the helper said it is ready, waiting up to `timeout` seconds (None: until it
        says so or ends); one that ended before it was is not started again."""
        if not self._ready and not self._failed_to_start and self._connection.poll(timeout):
            try:
                self._ready = self._connection.recv_bytes() == READY
                log.info("checkpoints from %d MiB on are serialised by helper process %d",
                         self.min_bytes >> 20, self._process.pid)
            except (EOFError, OSError):
                log.warning("the checkpoint serializer process ended as it started (exit code %s); "
                            "checkpoints are serialised in the trainer's own process", self._stop())
                self._failed_to_start = True
        return self._ready

    def write(self, store: Store, key: str, snapshot: Snapshot) -> ObjectInfo | None:
        """Stores `snapshot` as `key` of `store` (with its sha256) through the helper process. A
        helper still starting is waited for (its caller is a writer thread: training goes on, and
        writing in the trainer's process instead would take its CPU for longer than the wait); None
        if it could not start, or is not ready after START_SECONDS: its caller writes it then."""
        with self._lock:
            self._running()
            if not self._ready_for(snapshot):
                if not self._failed_to_start and not snapshot.cancelled:
                    log.warning("the checkpoint serializer process is not ready after %d s; %s is written by the "
                                "trainer's writer thread", START_SECONDS, key)
                return None
            try:
                with self._sending:
                    self._connection.send_bytes(pickle.dumps((store, key, snapshot.tree, snapshot.size)))
                    if snapshot.size:
                        send_handle(self._connection, snapshot.fd, self._process.pid)
                    self._in_flight = snapshot
                if snapshot.cancelled:  # before it was in flight
                    self.cancel(snapshot)
                outcome, result = pickle.loads(self._connection.recv_bytes())
            except (EOFError, OSError) as error:
                code = self._stop()
                raise StorageError(f"{store.uri}/{key}: the checkpoint serializer process ended "
                                   f"(exit code {code}) before the write was done") from error
            finally:
                with self._sending:
                    self._in_flight = None
        if outcome == "error":
            raise result
        return result

    def _ready_for(self, snapshot: Snapshot) -> bool:
        """Waits up to START_SECONDS for a starting helper, less if the snapshot's write is cancelled."""
        deadline = time.monotonic() + START_SECONDS
        while not self._check_ready(timeout=min(0.1, max(0.0, deadline - time.monotonic()))):
            if self._failed_to_start or snapshot.cancelled or time.monotonic() >= deadline:
                return False
        return True

    def cancel(self, snapshot: Snapshot) -> None:
        """Tells the helper to stop writing `snapshot`, if it is; a cancel that comes after the write
        was done is ignored there."""
        with self._sending:
            if self._in_flight is snapshot and self._connection is not None:
                with contextlib.suppress(OSError):  # the helper is gone: its write fails anyway
                    self._connection.send_bytes(CANCEL)

    def _stop(self) -> int | None:
        """Closes the helper's socket, which ends it; returns its exit code."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._ready = False
        process, self._process = self._process, None
        if process is None:
            return None
        try:
            return process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def close(self) -> None:
        """Lets the helper exit (call once no write is in progress: it finishes nothing)."""
        with self._lock:
            self._stop()

    def __del__(self) -> None:
        self.close()


def _exit_when_orphaned(parent: int) -> None:
    """A helper whose trainer is gone (killed at the end of a grace period) stops at once: its
    unfinished object never appears (a temporary file, an uncompleted multipart upload)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _lower_priority() -> None:
    """This process NICENESS below the trainer's priority, every thread of it (Linux keeps a
    niceness per thread, and importing torch may have started some)."""
    niceness = min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
    for thread in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that has ended since
            os.setpriority(os.PRIO_PROCESS, int(thread), niceness)


def serve(channel_fd: int, parent: int) -> None:
    """The helper's loop: one write per message until the trainer closes its end. Its imports ran
    at the trainer's priority, so it is ready within seconds even when training has begun; it
    writes NICENESS below it."""
    torch.set_num_threads(1)
    _lower_priority()
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    connection = Connection(channel_fd)
    try:
        connection.send_bytes(READY)
    except OSError:  # the trainer ended before this helper had started
        return

    def cancelled() -> bool:  # the trainer sends nothing else while it waits for a write
        return connection.poll() and connection.recv_bytes() == CANCEL

    while True:
        try:
            message = connection.recv_bytes()
        except (EOFError, OSError):  # the trainer closed its end, or is gone
            return
        if message == CANCEL:  # for a write that was done before it came
            continue
        store, key, tree, size = pickle.loads(message)
        fd = recv_handle(connection) if size else -1
        try:
            reply = pickle.dumps(("ok", _write(store, key, tree, fd, size, cancelled)))
        except Exception as error:  # noqa: BLE001 -- raised again in the trainer
            try:
                reply = pickle.dumps(("error", error))
            except Exception:  # noqa: BLE001 -- an exception that does not pickle: its words do
                reply = pickle.dumps(("error", StorageError(f"{store.uri}/{key}: {type(error).__name__}: {error}")))
        finally:
            if fd >= 0:
                os.close(fd)
        try:
            connection.send_bytes(reply)
        except OSError:  # the trainer is gone
            return
