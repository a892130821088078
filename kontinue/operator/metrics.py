"""Prometheus metrics of the operator: runs by phase, preemptions, failures, resume latency."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram

from kontinue.operator.verdicts import FAILED, PREEMPTED, Verdict, parse_time

RUNS = {"TrainingRun": Gauge("kontinue_trainingruns", "TrainingRuns by phase", ["phase"]),
        "TransferRun": Gauge("kontinue_transferruns", "TransferRuns by phase", ["phase"])}
PREEMPTIONS = Counter("kontinue_preemptions_total", "Trainer pods lost to preemption or eviction", ["reason"])
FAILURES = Counter("kontinue_attempt_failures_total", "Trainer pods that failed in code", ["reason"])
PODS = Counter("kontinue_trainer_pods_created_total", "Trainer pods created")
RESUME_LATENCY = Histogram("kontinue_resume_latency_seconds",
                           "From a preemption seen to the next trainer pod created",
                           buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))

_phases: dict[tuple[str, str, str], str] = {}  # (kind, namespace, name) -> phase
_lock = threading.Lock()


def phase(kind: str, namespace: str, name: str, value: str | None) -> None:
    with _lock:
        if value is None or _phases.get((kind, namespace, name)) == value:
            return
        _phases[(kind, namespace, name)] = value
        _publish()


def forget(kind: str, namespace: str, name: str) -> None:
    with _lock:
        _phases.pop((kind, namespace, name), None)
        _publish()


def _publish() -> None:
    counts = Tally((kind, phase) for (kind, _, _), phase in _phases.items())
    for kind, gauge in RUNS.items():
        for known in ("Pending", "Running", "Preempted", "Succeeded", "Failed"):
            gauge.labels(known).set(counts.get((kind, known), 0))


def verdict(outcome: Verdict) -> None:
    if outcome.outcome == PREEMPTED:
        PREEMPTIONS.labels(outcome.reason).inc()
    elif outcome.outcome == FAILED:
        FAILURES.labels(outcome.reason).inc()


def pod_created(status: dict, now: dt.datetime) -> None:
    """`status` as written with the pod's creation: a pod that resumes a preemption still has its
    Preempted condition True."""
    PODS.inc()
    preempted = status.get("preemptedTime")
    if preempted and any(c.get("type") == "Preempted" and c.get("status") == "True"
                         for c in status.get("conditions") or []):
        RESUME_LATENCY.observe(max(0.0, (now - parse_time(preempted)).total_seconds()))
