"""The trainer-operator contract, defined once: what a trainer process's exit code means.

The status line (kontinue.api.reports) says how a running attempt is doing; the exit code and the
termination message (the trainer's Outcome as JSON, kontinue.api.reports.termination_message) say
how it ended.
"""

from __future__ import annotations

SUCCEEDED_EXIT_CODE = 0
INVALID_SPEC_EXIT_CODE = 2   # the spec or its data cannot be trained: never retried
PREEMPTED_EXIT_CODE = 75     # EX_TEMPFAIL: stopped at a resume point, run me again
# A trainer whose run directory a newer attempt (or a re-created run) has claimed stops without
# writing (kontinue.trainer.ownership). Its pod is normally no longer the operator's current one, so
# nobody acts on the code; should it be (the operator's attempt count fell behind the directory's),
# "stopped with nothing lost, run the next attempt" is the right reading, hence the same code as a
# preemption. The termination message says "superseded".
SUPERSEDED_EXIT_CODE = PREEMPTED_EXIT_CODE


class InvalidInput(ValueError):
    """Input the trainer refuses before training (a missing column, a family this trainer cannot run);
    `field` names what to fix. A trainer pod exits INVALID_SPEC_EXIT_CODE on it, so the operator
    fails the run as InvalidSpec instead of retrying it as a code failure."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

# What the operator tells each trainer pod (environment variables), so the run directory can say
# which run and which attempt wrote it (identity and fencing, kontinue.api.identity).
RUN_UID_ENV = "KONTINUE_RUN_UID"
ATTEMPT_ENV = "KONTINUE_ATTEMPT"
