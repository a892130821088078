"""The run's next step, decided from the TrainingRun and its pods alone (no I/O, no memory).

Everything the operator knows lives on these objects, so an operator killed at any instant
decides the same thing when it comes back. Writes are ordered so that every crash point is
safe: the status names an attempt before its pod is created (pods have deterministic names),
and a verdict is recorded in the status before the pod it came from is deleted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from kontinue.api.identity import canonical, immutable_part, spec_digest
from kontinue.api.manifests import Problem, SpecError, describe, parse_resource
from kontinue.api.reports import MAX_WARNINGS
from kontinue.operator.pods import build_cleanup_pod, build_trainer_pod, pod_name, pod_problems
from kontinue.operator.verdicts import (FAILED, PENDING, PREEMPTED, RUNNING, SUCCEEDED, Verdict, judge_gone_pod,
                                        judge_pod, parse_time, vanished)

PENDING_PHASE, RUNNING_PHASE, PREEMPTED_PHASE = "Pending", "Running", "Preempted"
SUCCEEDED_PHASE, FAILED_PHASE = "Succeeded", "Failed"
TERMINAL_PHASES = (SUCCEEDED_PHASE, FAILED_PHASE)
CONDITION_TYPES = ("Running", "Preempted", "Succeeded", "Failed")
# Reasons of the failures no retry can mend; the run's pods are stopped with them.
INVALID_SPEC, IMAGE_NOT_ALLOWED, SPEC_CHANGED = "InvalidSpec", "ImageNotAllowed", "SpecChanged"


@dataclass(frozen=True)
class Settings:
    image: str = "ghcr.io/kontinue-dev/kontinue:0.1.0"
    grace_seconds: int = 120
    image_pull_timeout: float = 300.0
    backoff_base: float = 10.0
    backoff_max: float = 600.0
    gone_grace_seconds: float = 10.0  # how long a vanished pod's last state may take to arrive
    # how long a trainer pod tolerates its node not reporting (taint manager); a pod still there
    # this long after its grace period ended has no kubelet left to finish its deletion
    node_lost_seconds: int = 60
    # fnmatch globs (case-sensitive; * also matches /) of the other images a run's spec.image may
    # name; `image`, which runs that name none get, is always allowed.
    allowed_images: tuple[str, ...] = ()

    def image_patterns(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.image, *self.allowed_images)))

    def image_allowed(self, image: str) -> bool:
        return any(fnmatchcase(image, pattern) for pattern in self.image_patterns())


def parse_allowed_images(text: str | None) -> tuple[str, ...]:
    """`--allowed-images` / KONTINUE_ALLOWED_IMAGES: comma-separated globs, blanks ignored."""
    return tuple(pattern.strip() for pattern in (text or "").split(",") if pattern.strip())


@dataclass(frozen=True)
class Peers:
    """Other runs of the namespace the first attempt depends on (looked up only before it)."""

    namesake: str | None = None  # kind of another run of the same name: the two would share a run directory
    source_phase: str | None = SUCCEEDED_PHASE  # phase of the TrainingRun a TransferRun starts from; None: absent


WAIT_FOR_SOURCE_SECONDS = 30.0  # a source's success also wakes its TransferRuns at once
WAIT_FOR_EARLIER_POD_SECONDS = 2.0  # the old pod's deletion also wakes the run at once


@dataclass
class Plan:
    """What to write, in this order: status, then pods to delete, then the pod to create."""

    status: dict[str, Any] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    force_delete: list[str] = field(default_factory=list)  # pods no kubelet is left to remove
    create: dict[str, Any] | None = None
    events: list[tuple[str, str, str, int]] = field(default_factory=list)  # (type, reason, message, attempt)
    requeue_after: float | None = None
    verdict: Verdict | None = None
    attempt: int = 0  # the attempt the events are about

    def event(self, kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message, self.attempt))

    def requeue(self, delay: float) -> None:
        self.requeue_after = delay if self.requeue_after is None else min(self.requeue_after, delay)


def timestamp(now: dt.datetime) -> str:
    return now.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_conditions(current: list[dict[str, Any]], now: dt.datetime,
                   **wanted: tuple[str, str, str]) -> list[dict[str, Any]]:
    """Conditions by type; lastTransitionTime moves only when a condition's status changes."""
    by_type = {c["type"]: c for c in current}
    for kind, (state, reason, message) in wanted.items():
        old = by_type.get(kind, {})
        by_type[kind] = {"type": kind, "status": state, "reason": reason, "message": message,
                         "lastTransitionTime": old.get("lastTransitionTime", timestamp(now))
                         if old.get("status") == state else timestamp(now)}
    return [by_type[kind] for kind in CONDITION_TYPES if kind in by_type] + \
        [c for kind, c in by_type.items() if kind not in CONDITION_TYPES]


def _phase_change(plan: Plan, status: dict[str, Any], now: dt.datetime, phase: str, message: str,
                  **conditions: tuple[str, str, str]) -> None:
    plan.status.update(phase=phase, message=message,
                       conditions=set_conditions(status.get("conditions") or [], now, **conditions))


def split_pods(body: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pods labelled with a run's name: (those this very object owns, the others). The others are
    an earlier run's of the same name (deleted and created again while its pods still stop), or
    orphans: never this run's to judge, and its trainer must not start beside them."""
    uid = body["metadata"].get("uid")
    own, others = [], []
    for pod in pods:
        owners = {ref.get("uid") for ref in pod["metadata"].get("ownerReferences") or []}
        (own if uid in owners else others).append(pod)
    return own, others


def decide(body: dict[str, Any], pods: list[dict[str, Any]], now: dt.datetime, settings: Settings,
           last_seen: dict[str, Any] | None = None, peers: Peers = Peers(),
           earlier: list[dict[str, Any]] | None = None) -> Plan:
    """The next step for one TrainingRun or TransferRun given all pods labelled as its own, the
    last state of a pod of its that was just deleted (from the DELETED event), if that is what
    woke us, before its first attempt the runs it depends on, and the pods labelled with its name
    that it does not own (`split_pods`): no attempt starts while one of them is there."""
    status = body.get("status") or {}
    plan = Plan(attempt=int(status.get("attempt") or 0))
    try:
        run = parse_resource(body)
        if unreachable := pod_problems(run):  # paths a trainer pod cannot see fail the same way
            raise SpecError(unreachable, describe(body))
        if peers.namesake and not plan.attempt:
            raise SpecError([Problem("metadata.name", (
                f"a {peers.namesake} named {run.metadata.name} exists in this namespace; the two would "
                f"share the run directory {run.run_directory()}: rename one"))], describe(body))
    except SpecError as error:
        # Nothing of this run can be judged any more (not even its limits): its pods are stopped.
        return _give_up(plan, status, pods, now, INVALID_SPEC, str(error))
    if status.get("phase") in TERMINAL_PHASES:
        plan.delete.extend(_live(pods))  # a run that ended keeps no pod running (a crash mid-write)
        return plan
    if run.spec.image and not settings.image_allowed(run.spec.image):
        return _give_up(plan, status, pods, now, IMAGE_NOT_ALLOWED, (
            f"spec.image {run.spec.image} is not allowed: this operator runs only images matching "
            f"{', '.join(settings.image_patterns())} (its --allowed-images)"))
    spec = canonical(run.spec)
    if plan.attempt and status.get("specDigest") and spec_digest(spec) != status["specDigest"]:
        return _give_up(plan, status, pods, now, SPEC_CHANGED, _spec_changed(spec, status))
    if plan.attempt and not status.get("specDigest"):  # started by an operator that kept no digest
        plan.status.update(spec_identity(spec))
    if status.get("observedGeneration") != body["metadata"].get("generation"):
        plan.status["observedGeneration"] = body["metadata"].get("generation")

    current = status.get("currentPod")
    by_name = {pod["metadata"]["name"]: pod for pod in pods}
    stale = [name for name, pod in by_name.items()
             if name != current and not pod["metadata"].get("deletionTimestamp")]
    plan.delete.extend(stale)
    for pod in pods:
        if (deleted := parse_time(pod["metadata"].get("deletionTimestamp"))) is not None:
            plan.requeue(max(1.0, settings.node_lost_seconds - (now - deleted).total_seconds()))
        if (overdue := _overdue_deletion(pod, now, settings)) is not None:
            name = pod["metadata"]["name"]
            plan.force_delete.append(name)
            plan.event("Warning", "NodeLost", f"pod {name} was still terminating {overdue:.0f}s after its grace "
                       "period ended: its node stopped reporting; deleted it for good so the run resumes elsewhere")

    if current is None:
        if not plan.attempt and not _source_ready(plan, run, status, peers, now):
            return plan
        return _start_attempt(plan, body, run, status, by_name, now, settings, earlier)
    pod = by_name.get(current)
    if last_seen is not None and last_seen["metadata"].get("name") != current:
        last_seen = None
    if pod is None:
        if not status.get("podUid") and last_seen is None:
            # named in the status, never created: the operator stopped in between
            plan.create = build_trainer_pod(body, run, status["attempt"], image=settings.image,
                                            grace_seconds=settings.grace_seconds,
                                            node_lost_seconds=settings.node_lost_seconds)
            return plan
        verdict = judge_gone_pod(last_seen, now, settings.image_pull_timeout)
        if verdict is None:
            # Its last state may still be on its way (the DELETED event); judge after a grace period.
            gone = status.get("podGoneTime")
            waited = (now - parse_time(gone)).total_seconds() if gone else 0.0
            if waited < settings.gone_grace_seconds:
                if not gone:
                    plan.status["podGoneTime"] = timestamp(now)
                plan.requeue(settings.gone_grace_seconds - waited)
                return plan
            verdict = vanished(current)
    else:
        if status.get("podUid") != pod["metadata"].get("uid"):
            plan.status["podUid"] = pod["metadata"].get("uid")
        verdict = judge_pod(pod, now, settings.image_pull_timeout)
    plan.verdict = verdict
    if not verdict.final:
        _observe_live_pod(plan, status, verdict, current, now)
        return plan
    outcome = {SUCCEEDED: _succeeded, PREEMPTED: _preempted, FAILED: _failed}[verdict.outcome]
    outcome(plan, run, status, verdict, current, now, settings)
    if pod is not None and verdict.outcome != SUCCEEDED:
        plan.delete.append(current)  # the next attempt starts only once this pod is gone
    elif pod is None and plan.status.get("phase") not in TERMINAL_PHASES and not plan.status.get("nextAttemptTime"):
        others = {name: other for name, other in by_name.items() if name != current}
        _start_attempt(plan, body, run, {**status, **plan.status}, others, now, settings, earlier)
    return plan


def _live(pods: list[dict[str, Any]]) -> list[str]:
    """Names of the pods that may still run or be scheduled: not finished, not being deleted."""
    return [pod["metadata"]["name"] for pod in pods if not pod["metadata"].get("deletionTimestamp")
            and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")]


def _failed_reason(status: dict[str, Any]) -> str | None:
    return next((c.get("reason") for c in status.get("conditions") or []
                 if c.get("type") == "Failed" and c.get("status") == "True"), None)


def _give_up(plan: Plan, status: dict[str, Any], pods: list[dict[str, Any]], now: dt.datetime, reason: str,
             message: str) -> Plan:
    """Fails the run for a reason no retry mends, and stops every pod of it still running: a run
    the operator no longer looks after must not keep a GPU. A run that ended keeps its outcome."""
    plan.delete.extend(_live(pods))
    phase = status.get("phase")
    if phase in TERMINAL_PHASES and not (phase == FAILED_PHASE and _failed_reason(status) == reason):
        return plan
    if phase == FAILED_PHASE and status.get("message") == message:
        return plan  # said already
    _phase_change(plan, status, now, FAILED_PHASE, message, Running=("False", reason, message),
                  Failed=("True", reason, message))
    if status.get("currentPod"):
        plan.status.update(currentPod=None, podUid=None, podReason=None, podGoneTime=None)
    if not status.get("completionTime"):
        plan.status["completionTime"] = timestamp(now)
    plan.event("Warning", reason, message)
    return plan


def _field_digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def spec_identity(spec: dict[str, Any]) -> dict[str, Any]:
    """Status fields that pin a started run to its spec: the digest of its immutable fields
    (kontinue.api.identity, as the trainer computes it) and a short digest per field, which
    names the fields when they change. `spec` is the parsed spec's `canonical` form."""
    return {"specDigest": spec_digest(spec),
            "specFieldDigests": {name: _field_digest(value) for name, value in immutable_part(spec).items()}}


def changed_fields(spec: dict[str, Any], status: dict[str, Any]) -> list[str] | None:
    """The immutable fields (spec.x) whose digest differs from the recorded one; None if none were recorded."""
    recorded = status.get("specFieldDigests")
    if not isinstance(recorded, dict) or not recorded:
        return None
    digests = spec_identity(spec)["specFieldDigests"]
    return [f"spec.{name}" for name in sorted(set(digests) | set(recorded)) if digests.get(name) != recorded.get(name)]


def _spec_changed(spec: dict[str, Any], status: dict[str, Any]) -> str:
    names = changed_fields(spec, status)
    what = ", ".join(names) if names else "immutable fields (which ones was not recorded)"
    pod = f"; pod {status['currentPod']} is stopped" if status.get("currentPod") else ""
    return (f"{what} changed after the run started (attempt {status.get('attempt')}): a run directory holds "
            f"the training of the spec it started with and must not go on with another{pod}; create a new run "
            "for the new spec")


def _source_ready(plan: Plan, run, status, peers: Peers, now: dt.datetime) -> bool:
    """A TransferRun from a TrainingRun starts once that run has succeeded (both may be applied at once)."""
    source = getattr(run.spec, "source", None)
    if source is None or source.training_run is None or peers.source_phase == SUCCEEDED_PHASE:
        return True
    name = source.training_run
    if peers.source_phase == FAILED_PHASE:
        message = f"its source, TrainingRun {name}, failed"
        _phase_change(plan, status, now, FAILED_PHASE, message, Running=("False", "SourceFailed", message),
                      Failed=("True", "SourceFailed", message))
        plan.status["completionTime"] = timestamp(now)
        plan.event("Warning", "SourceFailed", message)
        return False
    message = f"waiting for TrainingRun {name} to succeed (it is {peers.source_phase or 'not there yet'})"
    if status.get("message") != message:
        _phase_change(plan, status, now, PENDING_PHASE, message, Running=("False", "WaitingForSource", message))
    plan.requeue(WAIT_FOR_SOURCE_SECONDS)
    return False


def _start_attempt(plan: Plan, body, run, status, by_name, now, settings, earlier=None) -> Plan:
    retry_at = status.get("nextAttemptTime")
    if retry_at:
        wait = (parse_time(retry_at) - now).total_seconds()
        if wait > 0:
            plan.requeue(wait)
            return plan
    if by_name:  # never two trainer pods writing one run directory
        plan.requeue(1.0)
        return plan
    if earlier:  # nor an earlier run's of that name (deleted, created again) still stopping
        return _wait_for_earlier_pods(plan, run, status, earlier, now)
    attempt = plan.attempt = int(status.get("attempt") or 0) + 1
    name = pod_name(run.metadata.name, attempt)
    plan.status.update(attempt=attempt, currentPod=name, podUid=None, podGoneTime=None, nextAttemptTime=None)
    if not status.get("specDigest"):  # the first attempt: from now on the spec's immutable fields are fixed
        plan.status.update(spec_identity(canonical(run.spec)))
    if not status.get("startTime"):
        plan.status["startTime"] = timestamp(now)
    resuming = f"resuming from {status['lastCheckpoint']['uri']} (step {status['lastCheckpoint'].get('step')})" \
        if status.get("lastCheckpoint") else "starting from the beginning"
    _phase_change(plan, status, now, PENDING_PHASE, f"attempt {attempt}: pod {name}, {resuming}",
                  Running=("False", "PodPending", f"waiting for pod {name}"))
    plan.create = build_trainer_pod(body, run, attempt, image=settings.image, grace_seconds=settings.grace_seconds,
                                    node_lost_seconds=settings.node_lost_seconds)
    plan.event("Normal", "AttemptStarted", f"attempt {attempt}: created pod {name}, {resuming}")
    return plan


def _wait_for_earlier_pods(plan: Plan, run, status, earlier: list[dict[str, Any]], now: dt.datetime) -> Plan:
    """Pods labelled with the run's name that another object owns (or none): an earlier run of that
    name was deleted and this one created while they still stop (a trainer saving a resume point
    into the same run directory). The run waits, saying for which pod; their deletion wakes it."""
    names = sorted(pod["metadata"]["name"] for pod in earlier)
    stopping = all(pod["metadata"].get("deletionTimestamp") for pod in earlier)
    pods, verb, them = ("pod", "is", "it") if len(names) == 1 else ("pods", "are", "them")
    message = (f"waiting to start: {pods} {', '.join(names)} of an earlier run named {run.metadata.name} {verb} "
               + ("still stopping" if stopping else f"still there (delete {them} if nothing will)")
               + "; two trainers must never write one run directory")
    if status.get("message") != message:
        _phase_change(plan, status, now, PENDING_PHASE, message, Running=("False", "WaitingForEarlierPod", message))
    plan.requeue(WAIT_FOR_EARLIER_POD_SECONDS)
    return plan


def cleanup_pod(body: dict[str, Any], run, settings: Settings) -> dict[str, Any]:
    """The pod that deletes a deleted run's directory (kontinue.operator.pods.build_cleanup_pod). It
    runs the run's image only if that is allowed, else the operator's: it mounts the run's volumes
    and Secret, so an image nobody allowed must not get them this way either."""
    pod = build_cleanup_pod(body, run, image=settings.image)
    image = run.spec.image if run.spec.image and settings.image_allowed(run.spec.image) else settings.image
    pod["spec"]["containers"][0]["image"] = image
    return pod


def refused_pod(body: dict[str, Any], name: str, message: str, now: dt.datetime, settings: Settings) -> Plan:
    """The API server refused the attempt's pod (a quota, an admission policy): say so, try again
    later. It is neither a failure of the code nor a preemption, so it counts as neither."""
    status = body.get("status") or {}
    plan = Plan(attempt=int(status.get("attempt") or 0))
    text = f"the API server refused pod {name}: {message}; retrying every {settings.backoff_base:.0f}s"
    if status.get("message") != text:
        _phase_change(plan, status, now, PENDING_PHASE, text, Running=("False", "PodCreateFailed", text))
        plan.event("Warning", "PodCreateFailed", text)
    plan.requeue(settings.backoff_base)
    return plan


def _observe_live_pod(plan: Plan, status, verdict: Verdict, current: str, now) -> None:
    if verdict.outcome == RUNNING and status.get("phase") != RUNNING_PHASE:
        message = f"attempt {status.get('attempt')}: pod {current} is running"
        _phase_change(plan, status, now, RUNNING_PHASE, message, Running=("True", "PodRunning", message),
                      Preempted=("False", "PodRunning", message))
        plan.event("Normal", "Running", message)
    elif verdict.outcome != RUNNING and verdict.reason != status.get("podReason"):
        message = f"pod {current}: {verdict.reason} {verdict.message}".strip()
        plan.status["message"] = message
        if verdict.outcome == PENDING:  # Unschedulable, ImagePullBackOff...: what `kubectl describe` shows
            plan.status["conditions"] = set_conditions(status.get("conditions") or [], now,
                                                       Running=("False", verdict.reason, message))
    plan.status["podReason"] = verdict.reason
    if verdict.recheck_after is not None:
        plan.requeue(max(0.0, verdict.recheck_after))


def _succeeded(plan: Plan, run, status, verdict: Verdict, current: str, now, settings) -> None:
    word = verdict.trainer
    message = f"attempt {status.get('attempt')} finished training"
    _phase_change(plan, status, now, SUCCEEDED_PHASE, message, Running=("False", "Completed", message),
                  Preempted=("False", "Completed", message), Succeeded=("True", "Completed", message))
    plan.status.update(completionTime=timestamp(now), progress="100%", progressRatio=1.0, lastCheckpoint=None)
    if word.get("model"):
        plan.status["bestCheckpoint"] = {**(status.get("bestCheckpoint") or {}), "uri": word["model"]}
    if word.get("dump"):
        plan.status["dumpedModelUri"] = word["dump"]
    scores = {**(word.get("scores") or {}), **{f"test_{k}": v for k, v in (word.get("test_scores") or {}).items()}}
    if scores:
        plan.status["metrics"] = scores
    plan.status.update(finite_status({key: plan.status[key] for key in ("metrics", "bestCheckpoint")
                                      if key in plan.status}, status))
    plan.event("Normal", "Succeeded", message)


def _preempted(plan: Plan, run, status, verdict: Verdict, current: str, now, settings) -> None:
    preemptions = int(status.get("preemptions") or 0) + 1
    plan.status.update(preemptions=preemptions, currentPod=None, podUid=None, podReason=None, podGoneTime=None,
                       preemptedTime=timestamp(now))
    step = verdict.trainer.get("step")
    if verdict.trainer.get("checkpoint"):
        plan.status["lastCheckpoint"] = verdict.trainer["checkpoint"]
    detail = f"pod {current} was preempted ({verdict.reason})" + (f" after step {step}" if step is not None else "")
    if preemptions > run.spec.max_preemptions:
        message = f"{detail}; that is more than spec.maxPreemptions ({run.spec.max_preemptions})"
        _phase_change(plan, status, now, FAILED_PHASE, message, Running=("False", "TooManyPreemptions", message),
                      Failed=("True", "TooManyPreemptions", message))
        plan.status["completionTime"] = timestamp(now)
        plan.event("Warning", "TooManyPreemptions", message)
        return
    message = f"{detail}; the next attempt resumes from the last checkpoint"
    _phase_change(plan, status, now, PREEMPTED_PHASE, message, Running=("False", verdict.reason, message),
                  Preempted=("True", verdict.reason, message))
    plan.event("Warning", "Preempted", message)


def _failed(plan: Plan, run, status, verdict: Verdict, current: str, now, settings: Settings) -> None:
    failures = int(status.get("failures") or 0) + 1
    plan.status.update(failures=failures, currentPod=None, podUid=None, podReason=None, podGoneTime=None)
    detail = f"pod {current} failed ({verdict.reason}): {verdict.message}"
    if verdict.reason == "InvalidSpec" or failures > run.spec.backoff_limit:
        # the trainer refused the spec or its data: another attempt would be refused the same way
        message = detail if verdict.reason == "InvalidSpec" else \
            f"{detail}; gave up after {failures} failures (spec.backoffLimit is {run.spec.backoff_limit})"
        _phase_change(plan, status, now, FAILED_PHASE, message, Running=("False", verdict.reason, message),
                      Failed=("True", verdict.reason, message))
        plan.status["completionTime"] = timestamp(now)
        plan.event("Warning", "Failed", message)
        return
    delay = min(settings.backoff_max, settings.backoff_base * 2 ** (failures - 1))
    message = f"{detail}; retrying in {delay:.0f}s (failure {failures} of {run.spec.backoff_limit} allowed)"
    plan.status["nextAttemptTime"] = timestamp(now + dt.timedelta(seconds=delay))
    _phase_change(plan, status, now, PENDING_PHASE, message, Running=("False", "BackOff", message))
    plan.event("Warning", "AttemptFailed", message)
    plan.requeue(delay)


def reported_status(report: dict[str, Any] | None, status: dict[str, Any]) -> dict[str, Any]:
    """Status fields from the trainer's newest status line (kontinue.api.reports) that differ.
    NaN and infinite numbers (a diverged loss) are left out and said in the warnings."""
    if not report:
        return {}
    update: dict[str, Any] = {key: report[key] for key in ("lastCheckpoint", "bestCheckpoint", "metrics", "warnings",
                                                           "sourceDumpUri") if report.get(key)}
    notes = []
    progress = report.get("progress")
    if isinstance(progress, (int, float)) and not isinstance(progress, bool):
        if math.isfinite(progress):
            ratio = min(1.0, max(0.0, float(progress)))
            update.update(progress=f"{round(100 * ratio)}%", progressRatio=ratio)
        else:
            notes.append(_non_finite_note("progress", progress))
    update = finite_status(update, status, notes, report=True)
    return {key: value for key, value in update.items() if status.get(key) != value}


# -- NaN and infinity: JSON has neither, and the API server refuses a status write that holds one -------

NON_FINITE_NOTE = " (JSON cannot carry it: left out of the status)"
_DROP = object()


def _non_finite_note(path: str, value: float) -> str:
    word = "NaN" if math.isnan(value) else "inf" if value > 0 else "-inf"
    name = f"metric {path.removeprefix('metrics.')}" if path.startswith("metrics.") else path
    return f"{name} is {word}{NON_FINITE_NOTE}"


def _finite(value: Any, current: Any, path: str, notes: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        notes.append(_non_finite_note(path, value))
        return _DROP
    if isinstance(value, dict):
        clean = {}
        for key, item in value.items():
            held = current.get(key) if isinstance(current, dict) else None
            item = _finite(item, held, f"{path}.{key}", notes)
            if item is not _DROP:
                clean[key] = item
            elif held is not None:
                clean[key] = None  # a merge patch deletes what the status still shows
        return clean
    if isinstance(value, list):
        return [clean for index, item in enumerate(value)
                if (clean := _finite(item, None, f"{path}[{index}]", notes)) is not _DROP]
    return value


def _overdue_deletion(pod: dict[str, Any], now: dt.datetime, settings: Settings) -> float | None:
    """Seconds past its grace period (and `node_lost_seconds` more) that a pod being deleted is
    still there, or None: a live kubelet removes a pod once its containers stopped, so a pod left
    Terminating this long is on a node that is gone (no kubelet will ever finish the delete)."""
    meta = pod["metadata"]
    deleted = parse_time(meta.get("deletionTimestamp"))
    if deleted is None:
        return None
    # deletionTimestamp is when the grace period ends (the API server adds it when marking)
    overdue = (now - deleted).total_seconds()
    return overdue if overdue >= settings.node_lost_seconds else None


def undeclared_status_fields(kind: str, update: dict[str, Any]) -> list[str]:
    """Top-level status fields the CRD does not declare: the API server would drop them silently
    (structural schemas prune), so the operator would decide from a status it never wrote."""
    from kontinue.api.models import TrainingRunStatus, TransferRunStatus

    model = TransferRunStatus if kind == "TransferRun" else TrainingRunStatus
    declared = {info.alias or name for name, info in model.model_fields.items()}
    return sorted(set(update) - declared)


def finite_status(update: dict[str, Any], status: dict[str, Any], notes: list[str] | None = None, *,
                  report: bool = False) -> dict[str, Any]:
    """`update` (status fields to write) without NaN or infinite numbers anywhere, each one named in
    status.warnings ("metric val_loss is NaN ..."); a field left out that the status holds is set
    to None, which removes it. With `report` (the update is the trainer's newest report, which says
    all there is) warnings of values no longer NaN go; otherwise new ones are only added."""
    notes = list(notes or [])
    clean: dict[str, Any] = {}
    for key, value in update.items():
        if key == "warnings":
            clean[key] = value
            continue
        item = _finite(value, status.get(key), key, notes)
        if item is not _DROP:
            clean[key] = item
        elif status.get(key) is not None:
            clean[key] = None
    warnings = list(clean.get("warnings", status.get("warnings") or []))
    if report:
        warnings = [w for w in warnings if not (isinstance(w, str) and w.endswith(NON_FINITE_NOTE))]
    warnings = (warnings + [note for note in notes if note not in warnings])[-MAX_WARNINGS:]
    if "warnings" in clean or warnings != (status.get("warnings") or []):
        clean["warnings"] = warnings
    return clean
