"""kopf handlers: every trigger (a run changed, one of its pods changed, a timer) calls one
level-triggered `reconcile`, which reads the run and its pods afresh and applies `decide`'s plan."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException

from kontinue.api.manifests import SpecError, parse_resource
from kontinue.api.reports import last_status
from kontinue.operator import metrics
from kontinue.operator.pods import ATTEMPT_LABEL, CONTAINER, RUN_LABEL, cleanup_pod_name, run_label
from kontinue.operator.reconcile import (PENDING_PHASE, RUNNING_PHASE, TERMINAL_PHASES, Peers, Plan, Settings,
                                         cleanup_pod, decide, finite_status, refused_pod, reported_status,
                                         split_pods, timestamp, undeclared_status_fields)
from kontinue.operator.verdicts import RUNNING, termination_message

GROUP, VERSION = "kontinue.dev", "v1alpha1"
PLURALS = {"TrainingRun": "trainingruns", "TransferRun": "transferruns"}
SAFETY_NET_INTERVAL = 60.0  # a run no event or requeue woke for this long is looked at anyway
LOG_TAIL_LINES = 200
CLEANUP_TIMEOUT = 600.0  # seconds a cleanup pod may take before the run is let go without it
STALE_READ_RETRIES = 3  # fresh reads a reconcile may take when its status write meets a newer run
log = logging.getLogger("kontinue.operator")


@dataclass
class Runtime:
    """What the handlers share in one operator process."""

    settings: Settings = field(default_factory=Settings)
    api: client.ApiClient | None = None
    locks: defaultdict = field(default_factory=lambda: defaultdict(threading.Lock))
    # Runs are keyed (plural, namespace, name).
    timers: dict = field(default_factory=dict)  # key -> (due, threading.Timer)
    timers_lock: threading.Lock = field(default_factory=threading.Lock)
    reconciled: dict = field(default_factory=dict)  # key -> time.monotonic() of the last reconcile

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)


RUNTIME = Runtime()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _ignore(status: int, call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except ApiException as error:
        if error.status != status:
            raise


def _get_run(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return RUNTIME.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def _labelled_pods(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Trainer pods labelled with the run's name, whoever owns them (split_pods tells)."""
    namespace, name = run["metadata"]["namespace"], run["metadata"]["name"]
    listing = RUNTIME.api.sanitize_for_serialization(
        RUNTIME.core.list_namespaced_pod(namespace, label_selector=f"{RUN_LABEL}={run_label(name)}"))
    return [pod for pod in listing.get("items", [])
            if pod["metadata"].get("labels", {}).get(RUN_LABEL) == run_label(name)
            and ATTEMPT_LABEL in pod["metadata"]["labels"]]


def _pods_of(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's trainer pods: labelled with it and owned by this very object (not a namesake's)."""
    return split_pods(run, _labelled_pods(run))[0]


def _event_name(run: dict[str, Any], attempt: int, reason: str, message: str) -> str:
    """One name per transition (run, attempt, reason), so that posting it again is a no-op."""
    meta = run["metadata"]
    key = f"{meta['uid']}/{attempt}/{reason}" + (f"/{message}" if reason == "InvalidSpec" else "")
    return f"{meta['name']}.{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _post_event(run: dict[str, Any], kind: str, reason: str, message: str, now: dt.datetime,
                attempt: int = 0) -> None:
    meta = run["metadata"]
    event = {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": _event_name(run, attempt, reason, message), "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": run["apiVersion"], "kind": run["kind"], "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta["uid"]},
        "type": kind, "reason": reason, "message": message[:1024],
        "firstTimestamp": timestamp(now), "lastTimestamp": timestamp(now), "count": 1,
        "source": {"component": "kontinue-operator"}, "reportingComponent": "kontinue-operator",
    }
    try:
        RUNTIME.core.create_namespaced_event(meta["namespace"], event)
    except ApiException as error:  # an event is worth a log line, never a failed reconcile
        if error.status != 409:  # 409: posted already, by a reconcile that did not get to finish
            log.warning("could not post event %s for %s: %s", reason, meta["name"], error.reason)


class StaleRead(Exception):
    """The run changed after it was read (409 on a write conditioned on its resourceVersion):
    nothing decided from that read may be applied."""


def _patch_status(run: dict[str, Any], status: dict[str, Any] | None) -> None:
    """A merge patch of the status that only applies to the version of the run it was decided on:
    it carries metadata.resourceVersion, so the API server refuses it (409) if anyone wrote the run
    since. With `status` None it changes nothing and only checks that the read is still current (a
    no-op write keeps the resourceVersion). The run's resourceVersion follows each write, so the
    writes of one plan check against each other."""
    meta = run["metadata"]
    body: dict[str, Any] = {"metadata": {"resourceVersion": meta["resourceVersion"]}}
    if status is not None:
        body["status"] = status
    try:
        written = RUNTIME.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURALS[run["kind"]], meta["name"], body)
    except ApiException as error:
        if error.status == 409:
            raise StaleRead(f"{run['kind']} {meta['namespace']}/{meta['name']} changed since "
                            f"resourceVersion {meta['resourceVersion']}") from error
        raise
    meta["resourceVersion"] = (written.get("metadata") or {}).get("resourceVersion", meta["resourceVersion"])


def _delete_pod(namespace: str, name: str, uid: str | None, *, force: bool = False) -> None:
    """Deletes the very pod the decision saw: a pod that took its name since (the same attempt
    created again) is left alone (409), one already gone is fine (404). `force`: at once (grace
    period 0), for a pod whose kubelet is gone."""
    options = client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid) if uid else None,
                                     grace_period_seconds=0 if force else None)
    try:
        RUNTIME.core.delete_namespaced_pod(name, namespace, body=options)
    except ApiException as error:
        if error.status not in (404, 409):
            raise


def _api_message(error: ApiException) -> str:
    try:
        return json.loads(error.body or "").get("message") or error.reason
    except (ValueError, AttributeError):
        return str(error.reason)


def _apply(run: dict[str, Any], plan: Plan, now: dt.datetime, uids: dict[str, str] | None = None) -> str | None:
    """Writes the plan, only if the run is still the version it was decided on (else StaleRead,
    before anything is written); returns the API server's message if it refused the pod to create.
    `uids`: pod name -> uid of the pods the decision saw."""
    meta = run["metadata"]
    current = run.get("status") or {}
    changed = {key: value for key, value in plan.status.items() if current.get(key) != value}
    if plan.events or (not changed and (plan.delete or plan.force_delete or plan.create is not None)):
        _patch_status(run, None)  # is the read still current? (a no-op: nothing is written)
    # Events next: a transition whose status write is lost (a crash, an API error further down)
    # is decided again by the next reconcile and posts the same event name, which is then a no-op;
    # posted after the writes, its event would be lost instead.
    for kind, reason, message, attempt in plan.events:
        _post_event(run, kind, reason, message, now, attempt)
    if changed:  # most reconciles change nothing; a no-op write would only wake every watcher
        _patch_status(run, changed)
    for name in plan.delete:
        _delete_pod(meta["namespace"], name, (uids or {}).get(name))
    for name in plan.force_delete:
        _delete_pod(meta["namespace"], name, (uids or {}).get(name), force=True)
    if plan.verdict is not None and plan.verdict.final:
        metrics.verdict(plan.verdict)
    if plan.create is not None:
        try:  # pods are named by attempt: one created by a reconcile that did not finish is this one
            RUNTIME.core.create_namespaced_pod(meta["namespace"], plan.create)
        except ApiException as error:
            if 400 <= error.status < 500 and error.status != 409:  # 409: created by an unfinished reconcile
                return _api_message(error)  # a quota or an admission policy: no use retrying at once
            if error.status != 409:
                raise
        metrics.pod_created({**current, **plan.status}, now)
    return None


def reconcile(plural: str, namespace: str, name: str, *, refresh: bool = False,
              last_seen: dict[str, Any] | None = None) -> float | None:
    """One step for one run; returns when to look again (None: on the next event or tick).

    `refresh` also reads the trainer's newest status line from its pod's log; `last_seen` is the
    last state of a pod of the run that was just deleted. A step decided on a read that a newer
    write overtook is dropped and decided again from a fresh read (a few times, then later)."""
    key = (plural, namespace, name)
    with RUNTIME.locks[key]:
        RUNTIME.reconciled[key] = time.monotonic()
        for _ in range(STALE_READ_RETRIES):
            try:
                return _reconcile_once(key, refresh, last_seen)
            except StaleRead as stale:
                log.info("%s; deciding again from a fresh read", stale)
        _reconcile_later(key, 1.0)
        return 1.0


def _reconcile_once(key: tuple[str, str, str], refresh: bool, last_seen: dict[str, Any] | None) -> float | None:
    plural, namespace, name = key
    run = _get_run(*key)
    if run is None or run["metadata"].get("deletionTimestamp"):
        return None
    now = _now()
    before = run.get("status") or {}
    started_or_over = before.get("attempt") or before.get("phase") in TERMINAL_PHASES
    peers = Peers() if started_or_over else _peers(run)  # they matter only before the first attempt
    pods, earlier = split_pods(run, _labelled_pods(run))
    if last_seen is not None and not split_pods(run, [last_seen])[0]:
        last_seen = None  # the last state of an earlier namesake's pod: never this run's to judge
    plan = decide(run, pods, now, RUNTIME.settings, last_seen, peers, earlier)
    if refresh and plan.verdict is not None and plan.verdict.outcome == RUNNING:
        plan.status.update(reported_status(_trainer_report(run), {**before, **plan.status}))
    plan.status = finite_status(plan.status, before)  # NaN or inf anywhere: the API server refuses the write
    if undeclared := undeclared_status_fields(run["kind"], plan.status):
        raise RuntimeError(f"status fields {undeclared} are not in the {run['kind']} CRD: the API server would drop them")
    uids = {pod["metadata"]["name"]: pod["metadata"].get("uid") for pod in pods}
    refusal = _apply(run, plan, now, uids)
    if refusal is not None:
        run = {**run, "status": {**before, **plan.status}}
        plan = refused_pod(run, plan.create["metadata"]["name"], refusal, now, RUNTIME.settings)
        _apply(run, plan, now, uids)
    phase = plan.status.get("phase") or before.get("phase")
    metrics.phase(run["kind"], namespace, name, phase)
    if run["kind"] == "TrainingRun" and phase in TERMINAL_PHASES and before.get("phase") != phase:
        _wake_transfers_from(namespace, name)
    if plan.requeue_after is not None:
        _reconcile_later(key, plan.requeue_after)
    return plan.requeue_after


def _peers(run: dict[str, Any]) -> Peers:
    """Before a run's first attempt: a run of the other kind with its name, and a TransferRun's source run."""
    meta = run["metadata"]
    other = next(kind for kind in PLURALS if kind != run["kind"])
    namesake = other if _get_run(PLURALS[other], meta["namespace"], meta["name"]) is not None else None
    source = (run.get("spec") or {}).get("source") if run["kind"] == "TransferRun" else None
    if not isinstance(source, dict) or not isinstance(source.get("trainingRun"), str):
        return Peers(namesake=namesake)
    source_run = _get_run("trainingruns", meta["namespace"], source["trainingRun"])
    return Peers(namesake=namesake, source_phase=None if source_run is None
                 else (source_run.get("status") or {}).get("phase") or PENDING_PHASE)


def _wake_transfers_from(namespace: str, name: str) -> None:
    """A TrainingRun just finished: the TransferRuns waiting for it look again now."""
    listing = RUNTIME.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "transferruns")
    for transfer in listing.get("items", []):
        source = (transfer.get("spec") or {}).get("source")
        if isinstance(source, dict) and source.get("trainingRun") == name \
                and not (transfer.get("status") or {}).get("attempt"):
            _reconcile_later(("transferruns", namespace, transfer["metadata"]["name"]), 0.0)


def _reconcile_later(key: tuple[str, str, str], delay: float) -> None:
    """kopf's event handlers cannot ask to be called again, so a timer thread does (at most one
    per run: the earliest). Back-off deadlines then hold to the second, not to the next tick."""
    due = time.monotonic() + delay
    with RUNTIME.timers_lock:
        pending = RUNTIME.timers.get(key)
        if pending is not None and pending[0] <= due:
            return
        if pending is not None:
            pending[1].cancel()
        timer = threading.Timer(delay, _reconcile_now, (key, due))
        timer.daemon = True
        RUNTIME.timers[key] = (due, timer)
        timer.start()


def _reconcile_now(key: tuple[str, str, str], due: float) -> None:
    with RUNTIME.timers_lock:
        if RUNTIME.timers.get(key, (None,))[0] == due:
            del RUNTIME.timers[key]
    try:
        reconcile(*key)
    except Exception:  # noqa: BLE001 - the next event or tick tries again
        log.exception("reconciling %s %s/%s failed", *key)


def _trainer_report(run: dict[str, Any]) -> dict[str, Any] | None:
    """The newest status line in the current pod's log."""
    meta, pod = run["metadata"], (run.get("status") or {}).get("currentPod")
    try:  # raw: the client would turn the text into the repr of its bytes
        response = RUNTIME.core.read_namespaced_pod_log(pod, meta["namespace"], container=CONTAINER,
                                                        tail_lines=LOG_TAIL_LINES, _preload_content=False)
    except ApiException as error:
        log.debug("no log for pod %s: %s", pod, error.reason)
        return None
    return last_status(response.data.decode("utf-8", errors="replace"))


# -- kopf wiring -----------------------------------------------------------------------------------

@kopf.on.event(GROUP, VERSION, "trainingruns")
@kopf.on.event(GROUP, VERSION, "transferruns")
def run_changed(type: str, name: str, namespace: str, resource: kopf.Resource, **_: Any) -> None:
    key = (resource.plural, namespace, name)
    if type == "DELETED":
        metrics.forget(resource.kind, namespace, name)
        RUNTIME.locks.pop(key, None)
        RUNTIME.reconciled.pop(key, None)
        return
    reconcile(*key)


@kopf.on.event("", "v1", "pods", labels={RUN_LABEL: kopf.PRESENT})
def pod_changed(type: str, body: kopf.Body, namespace: str, **_: Any) -> None:
    for owner in body.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") in PLURALS and owner.get("apiVersion", "").startswith(f"{GROUP}/"):
            reconcile(PLURALS[owner["kind"]], namespace, owner["name"],
                      last_seen=dict(body) if type == "DELETED" else None)


def tick(name: str, namespace: str, body: kopf.Body, resource: kopf.Resource, **_: Any) -> None:
    """Progress of running runs. For the others only a safety net: events and the requeues that
    decide asks for (back-off deadlines, image-pull time-outs) catch every decision on time, and
    thousands of runs waiting for GPUs must not keep the workers from the events."""
    key = (resource.plural, namespace, name)
    running = (body.get("status") or {}).get("phase") == RUNNING_PHASE
    if running or time.monotonic() - RUNTIME.reconciled.get(key, 0.0) >= SAFETY_NET_INTERVAL:
        reconcile(*key, refresh=running)


def tick_every(seconds: float) -> None:
    """Registers `tick` (the operator's --progress-seconds)."""
    for plural in PLURALS.values():
        kopf.timer(GROUP, VERSION, plural, interval=seconds, initial_delay=1.0,
                   when=lambda body, **_: (body.get("status") or {}).get("phase") not in TERMINAL_PHASES)(tick)


def _deletes_run_directory(body: kopf.Body, **_: Any) -> bool:
    """Safe on any spec (a CRD without validation lets anything through): kopf throttles an
    object whose filter raises, and logs the traceback, again and again."""
    spec = body.get("spec")
    return isinstance(spec, dict) and bool(spec.get("deleteRunDirectory"))


@kopf.on.delete(GROUP, VERSION, "trainingruns", when=_deletes_run_directory)
@kopf.on.delete(GROUP, VERSION, "transferruns", when=_deletes_run_directory)
def delete_run_directory(body: kopf.Body, namespace: str, runtime: dt.timedelta, **_: Any) -> None:
    """Pods go by ownerReference; the run directory only when the spec asks for it, and only once
    no trainer is left to write into it: the garbage collector stops pods only after the run is
    gone, and a stopping trainer still saves a resume point, so the handler stops them first.
    A cleanup pod deletes the directory: it mounts the run's volumes and Secret as the trainer
    did, so the operator needs neither. A run that never started an attempt (an invalid spec, a
    name another run uses) has no directory of its own to delete."""
    run_body = dict(body)
    if not (run_body.get("status") or {}).get("attempt"):
        return
    try:
        run = parse_resource(run_body)
    except SpecError:
        return
    trainers = _pods_of(run_body)
    for pod in trainers:
        if not pod["metadata"].get("deletionTimestamp"):
            _ignore(404, RUNTIME.core.delete_namespaced_pod, pod["metadata"]["name"], namespace)
    if trainers:
        raise kopf.TemporaryError(f"waiting for {len(trainers)} trainer pod(s) to stop", delay=2)
    name = cleanup_pod_name(run.metadata.name)
    try:
        cleanup = RUNTIME.api.sanitize_for_serialization(RUNTIME.core.read_namespaced_pod(name, namespace))
    except ApiException as error:
        if error.status != 404:
            raise
        _ignore(409, RUNTIME.core.create_namespaced_pod, namespace, cleanup_pod(run_body, run, RUNTIME.settings))
        raise kopf.TemporaryError(f"deleting {run.run_directory()} in pod {name}", delay=2)
    phase = (cleanup.get("status") or {}).get("phase")
    if phase == "Failed" or (phase != "Succeeded" and runtime.total_seconds() > CLEANUP_TIMEOUT):
        message = f"pod {name} could not delete {run.run_directory()}: " + (
            termination_message(cleanup) or f"still {phase} after {runtime.total_seconds():.0f}s")
        _post_event(run_body, "Warning", "RunDirectoryNotDeleted", message, _now())
        log.warning(message)
        return  # the run goes; its directory stays for a person to look at
    if phase != "Succeeded":
        raise kopf.TemporaryError(f"waiting for pod {name} to delete {run.run_directory()}", delay=2)
    log.info("deleted run directory %s", run.run_directory())
