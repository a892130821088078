"""Stop signals that arrive before training starts (kept light: installed before torch is imported)."""

from __future__ import annotations

import signal
import threading

STOP_BEFORE_TRAINING = threading.Event()


def defer_stop_signals() -> None:
    """For `kontinue train` and `run`: a SIGTERM or SIGINT that comes during set-up is kept rather
    than fatal, and the fit stops at its first resume point with the "preempted" exit code."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: STOP_BEFORE_TRAINING.set())
