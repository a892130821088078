"""Who a run directory belongs to (identity), and which attempt may write it (fencing).

`owner.json` in the run directory records the run (its Kubernetes uid, kind and name), the digest of
its spec's immutable fields (kontinue.api.identity.spec_digest) and the attempt that last claimed it:

    {"uid": "...", "run": "TrainingRun tests/exact", "specDigest": "...", "attempt": 3, "time": "..."}

**Identity.** Each attempt claims the directory before it writes anything (`Ownership.claim`, from
the pure rules in `decide`):

- an empty or unstarted directory (nothing trained yet) is claimed, whoever held it;
- the same spec digest under another uid (the run was deleted and re-created) continues it, and the
  record takes the new uid: the operator makes sure the old run's pod is gone first;
- a different digest is refused (`InvalidInput` on `spec.checkpoint.storage`, exit code 2), with
  whose directory it is and what to do: a re-created run must not silently resume another model.

Without `KONTINUE_RUN_UID` (`kontinue train` or `kontinue run` on a workstation) the digest check
still applies; such a run continues a directory without changing who holds it.

**Fencing.** The operator numbers attempts (`KONTINUE_ATTEMPT`); a trainer of an older attempt may
still be alive after its pod was replaced (a partitioned node). A trainer refuses to start when the
record holds a newer attempt of its run, and before every write that could overwrite a newer
attempt's work (a resume point, model.ckpt, status.json, kontinue.json, the dump, dropping the
resume points) `RunDirectory` calls `Ownership.check`: if the record no longer names this attempt
(another attempt or another run claimed the directory since), it raises `Superseded` and nothing is
written. `Superseded` ends the process with SUPERSEDED_EXIT_CODE (kontinue.api.contract). Under
DDP every rank claims (the same attempt: nothing changes); resume points are written by rank 0's
background writer, and a Superseded there reaches every rank through the per-step vote
(kontinue.trainer.callbacks.ResumePoints), while model.ckpt and status.json are rank 0's alone, so
there a superseded rank 0 exits by itself and the pod (whose main process it is) ends with it.

The remaining race: checking and writing are two operations, and neither S3 (this storage layer
has no conditional writes) nor a local rename looks at `owner.json`. A stale attempt that passed its
check just before a newer attempt claimed the directory completes the write it had begun (one
resume point, model.ckpt, status.json, kontinue.json or one dump), and its next check stops it.
Resume points are safe from it: their keys carry the attempt (`step-000000120-a3.ckpt`), so the
stale write is an object no `last.json` names, deleted by the newer attempt's next save, and the
pointer is checked for again right before it is replaced. Within one spec the other writes are
states of the same deterministic run: a newer attempt that reads them resumes to the same result,
and its own later writes replace a stale status.json. Across specs the window matters only
if a re-created run claims an unstarted directory while the old run's pod is still setting up: the
old kontinue.json could land after the new one. A claim is read-then-write too: of two attempts
claiming at the same instant the later write wins, whichever attempt it is (the operator starts an
attempt only once the previous pod is gone, so an older attempt is never just starting). Closing
the window needs conditional writes (If-Match on owner.json's ETag) or a lease. Each check is one
read of owner.json (one GET on S3).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kontinue.api.contract import ATTEMPT_ENV, RUN_UID_ENV, SUPERSEDED_EXIT_CODE, InvalidInput
from kontinue.api.identity import spec_digest
from kontinue.storage import ObjectNotFound, Store

log = logging.getLogger("kontinue.trainer")

OWNER = "owner.json"
FIELD = "spec.checkpoint.storage"

# What an attempt does with a run directory (Decision.action):
CLAIM = "claim"            # write the record naming this attempt, then go on
KEEP = "keep"              # the record already names this attempt (or a local run continues it): go on
REFUSE = "refuse"          # another spec's directory: InvalidInput
SUPERSEDED = "superseded"  # a newer attempt of this run holds it: stop without writing


class Superseded(SystemExit):
    """A newer attempt (or another run) has claimed the run directory: this attempt stops without
    writing. Uncaught, the process exits SUPERSEDED_EXIT_CODE."""

    def __init__(self, message: str):
        super().__init__(SUPERSEDED_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Claimant:
    """This attempt: which run (uid, None when run by hand), which spec, which attempt (None: unnumbered)."""

    uid: str | None
    digest: str
    attempt: int | None = None
    run: str = ""  # "TrainingRun namespace/name", for people reading the record

    @classmethod
    def of(cls, run: Any, environ: Mapping[str, str] | None = None) -> Claimant:
        """The claimant for a parsed TrainingRun or TransferRun, with uid and attempt from the
        variables the operator sets on trainer pods."""
        environ = os.environ if environ is None else environ
        attempt = environ.get(ATTEMPT_ENV) or None
        if attempt is not None:
            try:
                attempt = int(attempt)
            except ValueError:
                raise InvalidInput(ATTEMPT_ENV, f"must be a whole number, not {attempt!r}") from None
        digest = spec_digest(run.spec)
        name = f"{type(run).__name__} {run.metadata.namespace or 'default'}/{run.metadata.name}"
        return cls(uid=environ.get(RUN_UID_ENV) or None, digest=digest, attempt=attempt, run=name)

    def record(self, time: str) -> dict[str, Any]:
        return {"uid": self.uid, "run": self.run, "specDigest": self.digest, "attempt": self.attempt,
                "time": time}


@dataclass(frozen=True)
class Decision:
    action: str
    record: dict[str, Any] | None  # CLAIM: the record to write; KEEP: the one in force
    message: str = ""


def _holder(record: Mapping[str, Any]) -> tuple[Any, Any]:
    return record.get("uid"), record.get("attempt")


def _whose(record: Mapping[str, Any]) -> str:
    who = record.get("run") or "a run"
    uid = record.get("uid")
    return f"{who} (uid {uid})" if uid else f"{who} (run without a Kubernetes uid)"


def decide(record: Mapping[str, Any] | None, me: Claimant, *, claimable: bool, where: str,
           time: str = "") -> Decision:
    """The rules, as a pure function. `record` is owner.json (None if absent); `claimable` is true
    when nothing was trained in the directory yet (empty or unstarted); `where` names it in messages."""
    mine = me.record(time)
    if record is None:  # a new directory, or one written before run directories had owners
        return Decision(CLAIM, mine, "" if claimable else
                        f"{where} holds a run but no {OWNER}; claiming it without a spec check")
    recorded_attempt = record.get("attempt")
    if (me.attempt is not None and isinstance(recorded_attempt, int) and recorded_attempt > me.attempt
            and record.get("uid") == me.uid):
        return Decision(SUPERSEDED, None,
                        f"attempt {recorded_attempt} of this run claimed {where} at {record.get('time')}; "
                        f"attempt {me.attempt} stops without writing to it")
    if record.get("specDigest") != me.digest:
        if claimable:
            return Decision(CLAIM, mine)
        return Decision(REFUSE, None,
                        f"{where} belongs to {_whose(record)}, trained from a different spec (digest "
                        f"{str(record.get('specDigest'))[:12]}, this spec's is {me.digest[:12]}); it was not "
                        "touched. Delete that run directory to start this run over, or choose another "
                        "spec.checkpoint.storage")
    if me.uid is None and me.attempt is None:
        return Decision(KEEP, dict(record))  # by hand: continue as the holder, without claiming
    if _holder(record) == (me.uid, me.attempt):
        return Decision(KEEP, dict(record))  # this attempt already holds it (another DDP rank)
    return Decision(CLAIM, mine)  # a later attempt, or the same spec under a re-created run's uid


class Ownership:
    """The record in one Store (the run directory itself: local path or s3://), claimed once at the
    start of an attempt and checked before every write. One per trainer process."""

    def __init__(self, store: Store, me: Claimant):
        self.store, self.me = store, me
        self.holder: tuple[Any, Any] | None = None  # the (uid, attempt) this process writes as
        self.superseded: str | None = None  # why, once found: later writes stop without reading again

    def read(self) -> dict[str, Any] | None:
        """owner.json, None if there is none (or it is not a record: then the next claim replaces it)."""
        try:
            record = json.loads(self.store.read_text(OWNER))
        except (ObjectNotFound, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def claim(self, *, claimable: bool, time: str) -> Decision:
        """Decides, and writes the record on CLAIM. Raises InvalidInput (another spec) or Superseded."""
        decision = decide(self.read(), self.me, claimable=claimable, where=self.store.uri, time=time)
        if decision.action == REFUSE:
            raise InvalidInput(FIELD, decision.message)
        if decision.action == SUPERSEDED:
            self.superseded = decision.message
            raise Superseded(decision.message)
        if decision.action == CLAIM:
            if decision.message:
                log.warning(decision.message)
            self.store.write_text(OWNER, json.dumps(decision.record, indent=2))
            log.info("run directory %s claimed by %s, attempt %s", self.store.uri, self.me.uid or "this run",
                     self.me.attempt if self.me.attempt is not None else "(unnumbered)")
        self.holder = _holder(decision.record)
        return decision

    def check(self) -> None:
        """Raises Superseded if the record no longer names this attempt. A record that is gone (the
        directory was emptied under us) is not a newer claim: only a claim writes one."""
        if self.superseded is not None:
            raise Superseded(self.superseded)
        if self.holder is None:
            return
        record = self.read()
        if record is None or _holder(record) == self.holder:
            return
        uid, attempt = _holder(record)
        who = f"attempt {attempt} of this run" if uid == self.holder[0] else f"{_whose(record)}, attempt {attempt}"
        self.superseded = (f"{who} claimed {self.store.uri} at {record.get('time')}; this attempt "
                           f"({self.holder[1] if self.holder[1] is not None else 'unnumbered'}) stops "
                           "without writing to it")
        raise Superseded(self.superseded)
