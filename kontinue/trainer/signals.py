"""Stop signals outside the training loop (kept light: installed before torch is imported)."""

from __future__ import annotations

import signal
import threading

# Set by a SIGTERM or SIGINT during set-up (the fit then stops at its first resume point) or during
# the run's last steps after training (scoring the test data, the dump: the attempt stops between
# them). During training, the ResumePoints callback handles the signals itself.
STOP_REQUESTED = threading.Event()


_deferring = False


def defer_stop_signals() -> None:
    """For `kontinue train` and `run`: a SIGTERM or SIGINT outside the training loop is kept rather
    than fatal, and the attempt stops at the next safe point with the "preempted" exit code."""
    global _deferring
    _deferring = True
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: STOP_REQUESTED.set())


def keep_stop_for_last_steps() -> None:
    """A stop that came during training too late for a resume point (in its last step) stops the
    attempt before the run's last steps instead, where stop signals are deferred; a Python
    caller's fit has simply ended."""
    if _deferring:
        STOP_REQUESTED.set()
