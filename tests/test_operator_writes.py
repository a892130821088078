"""How the operator writes what it decided: only against the version of the run it read.

An in-memory API (the calls handlers.py makes, with the API server's preconditions: a merge patch
that carries metadata.resourceVersion is refused with 409 when the object moved on, a delete with a
uid precondition with 409 when the name now holds another pod, and JSON without NaN) stands in for
the cluster; a hook plays the other writer between the operator's read and its writes.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from kubernetes.client.rest import ApiException

from kontinue.operator import handlers
from kontinue.operator.pods import ATTEMPT_LABEL, RUN_LABEL
from kontinue.operator.reconcile import Settings


def _error(status: int, message: str = "") -> ApiException:
    error = ApiException(status=status, reason=message)
    error.body = json.dumps({"message": message})
    return error


class FakeApi:
    """One namespace's TrainingRuns, pods and events."""

    def __init__(self, run: dict):
        self.runs = {run["metadata"]["name"]: copy.deepcopy(run)}
        self.pods: dict[str, dict] = {}
        self.events: dict[str, dict] = {}
        self.rv = int(run["metadata"]["resourceVersion"])
        self.after_get = []  # callables run once each, right after a read of the run: the other writer
        self.calls: list[tuple] = []

    # -- CustomObjectsApi
    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if plural != "trainingruns" or name not in self.runs:
            raise _error(404, "not found")
        read = copy.deepcopy(self.runs[name])
        if self.after_get:
            self.after_get.pop(0)(self)
        return read

    def patch_namespaced_custom_object_status(self, group, version, namespace, plural, name, body):
        self.calls.append(("patch", copy.deepcopy(body)))
        json.dumps(body, allow_nan=False)  # the API server reads JSON, which has no NaN
        stored = self.runs[name]
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != stored["metadata"]["resourceVersion"]:
            raise _error(409, "the object has been modified; please apply your changes to the latest version")
        new = copy.deepcopy(stored)
        status = new.setdefault("status", {})
        for key, value in (body.get("status") or {}).items():
            if value is None:
                status.pop(key, None)
            elif isinstance(value, dict) and isinstance(status.get(key), dict):
                status[key] = {k: v for k, v in {**status[key], **value}.items() if v is not None}
            else:
                status[key] = value
        if new != stored:
            self.write(new)
        return copy.deepcopy(self.runs[name])

    def list_namespaced_custom_object(self, group, version, namespace, plural):
        return {"items": []}

    # -- CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector):
        return {"items": [copy.deepcopy(pod) for pod in self.pods.values()]}

    def create_namespaced_pod(self, namespace, body):
        self.calls.append(("create", body["metadata"]["name"]))
        if body["metadata"]["name"] in self.pods:
            raise _error(409, "already exists")
        pod = copy.deepcopy(body)
        pod["metadata"]["uid"] = f"uid-{pod['metadata']['name']}-{len(self.calls)}"
        pod["status"] = {"phase": "Pending"}
        self.pods[pod["metadata"]["name"]] = pod

    def delete_namespaced_pod(self, name, namespace, body=None):
        self.calls.append(("delete", name))
        if name not in self.pods:
            raise _error(404, "not found")
        uid = body.preconditions.uid if body is not None and body.preconditions is not None else None
        if uid is not None and uid != self.pods[name]["metadata"]["uid"]:
            raise _error(409, "Precondition failed: UID in precondition does not match")
        del self.pods[name]

    def create_namespaced_event(self, namespace, event):
        if event["metadata"]["name"] in self.events:
            raise _error(409, "already exists")
        self.events[event["metadata"]["name"]] = event

    def read_namespaced_pod_log(self, name, namespace, **_):
        return SimpleNamespace(data=self.log.encode())

    # -- helpers
    def write(self, run: dict) -> None:
        self.rv += 1
        run["metadata"]["resourceVersion"] = str(self.rv)
        self.runs[run["metadata"]["name"]] = run

    def run(self, name="sst") -> dict:
        return self.runs[name]

    def reasons(self) -> list[str]:
        return sorted(event["reason"] for event in self.events.values())


@dataclass
class FakeRuntime(handlers.Runtime):
    fake: FakeApi | None = None
    later: list = field(default_factory=list)

    @property
    def core(self):
        return self.fake

    @property
    def custom(self):
        return self.fake


@pytest.fixture
def cluster(monkeypatch):
    def make(status: dict, pods: list[dict] = ()) -> FakeApi:
        run = {"apiVersion": "kontinue.dev/v1alpha1", "kind": "TrainingRun",
               "metadata": {"name": "sst", "namespace": "ml", "uid": "uid-1", "generation": 1, "resourceVersion": "10"},
               "spec": {"task": {"label": "label"}, "data": {"train": "s3://data/sst/train.parquet"},
                        "model": {"hfText": {"checkpoint": "/models/minilm"}},
                        "checkpoint": {"storage": "s3://runs/ckpt", "secretRef": {"name": "s3"}}},
               "status": status}
        fake = FakeApi(run)
        for pod in pods:
            fake.pods[pod["metadata"]["name"]] = pod
        runtime = FakeRuntime(settings=Settings(image="registry.example/kontinue:1"), fake=fake,
                              api=SimpleNamespace(sanitize_for_serialization=lambda value: value))
        monkeypatch.setattr(handlers, "RUNTIME", runtime)
        monkeypatch.setattr(handlers, "_reconcile_later", lambda key, delay: runtime.later.append((key, delay)))
        return fake
    return make


def trainer_pod(name: str, uid: str, *, phase: str = "Running", terminated: dict | None = None) -> dict:
    state = {"terminated": terminated} if terminated else {"running": {}}
    return {"metadata": {"name": name, "namespace": "ml", "uid": uid, "creationTimestamp": "2026-11-22T12:00:00Z",
                         "labels": {RUN_LABEL: "sst", ATTEMPT_LABEL: name.rsplit("-", 1)[1]},
                         "ownerReferences": [{"kind": "TrainingRun", "uid": "uid-1", "name": "sst"}]},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "state": state}]}}


PREEMPTED = {"exitCode": 75, "reason": "Error", "message": json.dumps({"result": "preempted", "step": 40})}
RUNNING = {"attempt": 1, "currentPod": "sst-1", "podUid": "uid-sst-1", "phase": "Running"}


def test_a_decision_on_a_read_another_writer_overtook_is_never_applied_but_decided_again(cluster):
    """Two operators (a peering hand-over) see the same preempted pod: the one that writes second
    must not count the preemption again nor post its event on that read."""
    fake = cluster(RUNNING, [trainer_pod("sst-1", "uid-sst-1", phase="Failed", terminated=PREEMPTED)])

    def other_operator(api: FakeApi) -> None:  # judged the same pod first (and is about to delete it)
        run = copy.deepcopy(api.run())
        run["status"].update(preemptions=1, currentPod=None, podUid=None, phase="Preempted")
        api.write(run)
    fake.after_get.append(other_operator)

    handlers.reconcile("trainingruns", "ml", "sst")
    patches = [body for kind, body in fake.calls if kind == "patch"]
    assert patches[0] == {"metadata": {"resourceVersion": "10"}}, "the stale decision stopped at the check"
    assert all(body["metadata"]["resourceVersion"] for body in patches), "every status write is conditional"
    assert fake.run()["status"]["preemptions"] == 1 and not fake.events, "counted once, said by the other"
    assert fake.pods == {}, "decided again from the fresh read: the old pod goes before the next attempt"
    handlers.reconcile("trainingruns", "ml", "sst")
    status = fake.run()["status"]
    assert (status["attempt"], status["currentPod"], status["preemptions"]) == (2, "sst-2", 1)
    assert list(fake.pods) == ["sst-2"] and fake.reasons() == ["AttemptStarted"]


def test_a_run_that_keeps_moving_is_left_for_a_later_look(cluster):
    fake = cluster(RUNNING, [trainer_pod("sst-1", "uid-sst-1", phase="Failed", terminated=PREEMPTED)])

    def touch(api: FakeApi) -> None:
        run = copy.deepcopy(api.run())
        run["status"]["message"] = f"touched {api.rv}"
        api.write(run)
    fake.after_get.extend([touch] * handlers.STALE_READ_RETRIES)
    assert handlers.reconcile("trainingruns", "ml", "sst") == 1.0
    assert handlers.RUNTIME.later == [(("trainingruns", "ml", "sst"), 1.0)]
    assert "preemptions" not in fake.run()["status"] and "sst-1" in fake.pods and not fake.events


def test_pod_deletes_name_the_pod_the_decision_saw(cluster):
    fake = cluster(RUNNING, [trainer_pod("sst-1", "uid-new")])  # sst-1 was created again since
    handlers._delete_pod("ml", "sst-1", "uid-old")
    assert "sst-1" in fake.pods, "a pod that took the name since is left alone"
    handlers._delete_pod("ml", "sst-1", "uid-new")
    handlers._delete_pod("ml", "sst-1", "uid-new")  # gone already: fine
    assert fake.pods == {}


def test_a_create_decided_twice_makes_one_pod(cluster):
    fake = cluster({"attempt": 1, "currentPod": "sst-1", "phase": "Pending"})
    handlers.reconcile("trainingruns", "ml", "sst")  # named in the status, never created: created now
    fake.after_get.append(lambda api: None)
    handlers.reconcile("trainingruns", "ml", "sst")
    assert list(fake.pods) == ["sst-1"] and [c for c in fake.calls if c[0] == "create"] == [("create", "sst-1")]


def test_a_diverged_loss_in_the_trainer_report_never_fails_the_status_write(cluster):
    fake = cluster({**RUNNING, "metrics": {"val_loss": 0.4}})
    fake.pods["sst-1"] = trainer_pod("sst-1", "uid-sst-1")
    fake.log = 'kontinue-status: {"progress": NaN, "metrics": {"val_loss": NaN, "val_acc": 0.5}}\n'
    handlers.reconcile("trainingruns", "ml", "sst", refresh=True)
    status = fake.run()["status"]
    assert status["metrics"] == {"val_acc": 0.5} and "progressRatio" not in status
    assert [w.split(" (")[0] for w in status["warnings"]] == ["progress is NaN", "metric val_loss is NaN"]
