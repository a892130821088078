"""Large buffers kept from one checkpoint to the next.

A fresh mapping costs its page faults the first time each page is written: allocating and zeroing
take longer than the copy itself (26 ms against 3.5 ms to fill 32 MiB here). Every resume point
needs buffers of the same sizes again (a snapshot's, an upload's parts), so those freed are kept,
a few of them, for the next taker of their size.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Buffer(Protocol):
    def __len__(self) -> int: ...

    def close(self) -> None: ...


B = TypeVar("B", bound=Buffer)


class SpareBuffers(Generic[B]):
    """Buffers given back, kept for the next ``take`` of their size: up to ``keep``, the most
    recently given back taken first, the least recently given back closed first. A forked child
    (a loader worker) lets go of its parent's, which would otherwise stay allocated until it exits
    even after the parent freed them. Meant for module-level pools: each registers a fork hook."""

    def __init__(self, keep: int, allocate: Callable[[int], B]):
        self.keep, self._allocate = keep, allocate
        self._lock = threading.Lock()
        self._spares: list[B] = []  # least recently given back first
        os.register_at_fork(after_in_child=self.forget)

    def take(self, size: int) -> B:
        """A buffer of ``size`` bytes: a spare one if there is, else a new one."""
        with self._lock:
            for index in reversed(range(len(self._spares))):
                if len(self._spares[index]) == size:
                    return self._spares.pop(index)
        return self._allocate(size)

    def give_back(self, buffer: B) -> None:
        """Keeps ``buffer``, which no one reads or writes any more, for the next taker of its size."""
        with self._lock:
            self._spares.append(buffer)
            dropped = self._spares[:max(0, len(self._spares) - self.keep)]
            del self._spares[:len(dropped)]
        for old in dropped:
            with contextlib.suppress(BufferError):  # one still viewed somewhere goes with its last view
                old.close()

    def forget(self) -> None:
        """In a forked child: closes the parent's spares (the child's copies of them)."""
        self._lock = threading.Lock()  # another thread may have held it at the fork
        spares, self._spares = self._spares, []
        for buffer in spares:
            with contextlib.suppress(BufferError, OSError):
                buffer.close()
