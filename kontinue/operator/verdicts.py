"""Pod -> verdict: what happened to a trainer pod, decided from the pod object alone.

Exit codes alone mislead (a SIGTERMed Lightning process exits 0; a kill by the node looks like
a crash), so the verdict reads, in order: the DisruptionTarget condition the control plane sets
on preemption and eviction, the trainer's own last word in its termination message, then the
container's termination reason and exit code.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from kontinue.api.contract import INVALID_SPEC_EXIT_CODE, PREEMPTED_EXIT_CODE
from kontinue.api.reports import loads
from kontinue.operator.pods import CONTAINER

PENDING, RUNNING, SUCCEEDED, PREEMPTED, FAILED = "pending", "running", "succeeded", "preempted", "failed"
DISRUPTION_REASONS = {"PreemptionByScheduler", "TerminationByKubelet", "EvictionByEvictionAPI",
                      "DeletionByTaintManager", "DeletionByPodGC"}
IMAGE_PROBLEMS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
CONFIG_PROBLEMS = {"CreateContainerConfigError", "CreateContainerError"}


@dataclass(frozen=True)
class Verdict:
    outcome: str  # pending | running | succeeded | preempted | failed
    reason: str
    message: str = ""
    trainer: dict[str, Any] = field(default_factory=dict)  # the trainer's termination message
    recheck_after: float | None = None  # seconds until this verdict may change with no event

    @property
    def final(self) -> bool:
        return self.outcome in (SUCCEEDED, PREEMPTED, FAILED)


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _container_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == CONTAINER), statuses[0] if statuses else {})


def termination_message(pod: dict[str, Any]) -> str:
    """What the container left in its termination message (its log's tail, if it crashed)."""
    terminated = _container_status(pod).get("state", {}).get("terminated") or {}
    return (terminated.get("message") or "").strip()[-1000:]


def _trainer_word(terminated: dict[str, Any]) -> dict[str, Any]:
    """The trainer's Outcome from its termination message (kontinue.api.reports), NaN scores as
    floats again; {} for text (a refused spec, a crash's log tail)."""
    try:
        word = loads(terminated.get("message") or "")
    except ValueError:
        return {}
    return word if isinstance(word, dict) else {}


def _disruption(pod: dict[str, Any]) -> dict[str, Any] | None:
    for condition in pod.get("status", {}).get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            return condition
    return None


def judge_pod(pod: dict[str, Any], now: dt.datetime, image_pull_timeout: float = 300.0) -> Verdict:
    """What the pod's state means for its run. `now` lets tests judge time-outs deterministically."""
    status = pod.get("status", {})
    container = _container_status(pod)
    state = container.get("state", {})
    terminated = state.get("terminated") or {}
    word = _trainer_word(terminated)
    disruption = _disruption(pod)

    if terminated:
        code = terminated.get("exitCode")
        if code == 0 and word.get("result") == "succeeded":
            return Verdict(SUCCEEDED, "Completed", "the trainer finished", word)
        if disruption is not None:
            return Verdict(PREEMPTED, disruption.get("reason") or "DisruptionTarget",
                           disruption.get("message", ""), word)
        if code == PREEMPTED_EXIT_CODE or word.get("result") == "preempted":
            return Verdict(PREEMPTED, "TrainerStopped",
                           f"the trainer saved a resume point at step {word.get('step')} and stopped", word)
        if terminated.get("reason") == "OOMKilled":
            return Verdict(FAILED, "OOMKilled", "the trainer ran out of memory; raise spec.resources.memory "
                           "or lower env.per_gpu_batch_size", word)
        if code in (137, 143):  # killed by a signal with no disruption recorded: the node, not the code
            return Verdict(PREEMPTED, "KilledBySignal", f"the trainer was killed (exit code {code})", word)
        detail = termination_message(pod)
        if code == 0:
            return Verdict(FAILED, "NoResult", "the trainer exited 0 without reporting a result", word)
        return Verdict(FAILED, "TrainerError" if code != INVALID_SPEC_EXIT_CODE else "InvalidSpec",
                       f"the trainer exited with code {code}" + (f": {detail}" if detail else ""), word)

    if disruption is not None and pod.get("metadata", {}).get("deletionTimestamp"):
        return Verdict(RUNNING, "Terminating", "the pod is being stopped: " + disruption.get("reason", ""))
    if status.get("phase") == "Failed":  # e.g. node-pressure eviction, which sets no condition
        reason = status.get("reason") or "PodFailed"
        return Verdict(PREEMPTED if reason == "Evicted" else FAILED, reason, status.get("message", ""))

    waiting = state.get("waiting") or {}
    if waiting.get("reason") in IMAGE_PROBLEMS | CONFIG_PROBLEMS:
        created = parse_time(pod.get("metadata", {}).get("creationTimestamp")) or now
        waited = (now - created).total_seconds()
        if waiting.get("reason") == "InvalidImageName" or waited >= image_pull_timeout:
            reason = "ImagePullFailed" if waiting.get("reason") in IMAGE_PROBLEMS else waiting["reason"]
            return Verdict(FAILED, reason, waiting.get("message") or f"{waiting['reason']} for {waited:.0f}s")
        return Verdict(PENDING, waiting["reason"], waiting.get("message", ""),
                       recheck_after=image_pull_timeout - waited)
    if "running" in state:
        return Verdict(RUNNING, "Running")
    if waiting.get("reason"):
        return Verdict(PENDING, waiting["reason"], waiting.get("message", ""))
    unscheduled = next((c for c in status.get("conditions") or []
                        if c.get("type") == "PodScheduled" and c.get("status") == "False"), None)
    if unscheduled is not None:  # e.g. "0/8 nodes are available: 8 Insufficient nvidia.com/gpu."
        return Verdict(PENDING, unscheduled.get("reason") or "Unschedulable", unscheduled.get("message", ""))
    return Verdict(PENDING, status.get("phase") or "Pending", status.get("message", ""))


def judge_gone_pod(last_seen: dict[str, Any] | None, now: dt.datetime,
                   image_pull_timeout: float = 300.0) -> Verdict | None:
    """A pod that no longer exists, by its last state (from its DELETED event); None when that
    state says nothing final: the pod never reported an end of its own."""
    if last_seen is None:
        return None
    verdict = judge_pod(last_seen, now, image_pull_timeout)
    if verdict.final:
        return verdict
    disruption = _disruption(last_seen)
    if disruption is not None:
        return Verdict(PREEMPTED, disruption.get("reason") or "DisruptionTarget", disruption.get("message", ""))
    return None


def vanished(name: str) -> Verdict:
    """A pod gone with no last word: its node went, or somebody deleted it."""
    return Verdict(PREEMPTED, "PodDeleted", f"pod {name} disappeared before it finished "
                   "(its node is gone, or it was deleted)")
