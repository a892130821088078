"""The operator's pure decisions: spec -> pod manifest, pod -> verdict, (run, pods) -> plan."""

from __future__ import annotations

import copy
import datetime as dt
import json

import kubernetes_validate
import pytest

from kontinue.api.identity import spec_digest
from kontinue.api.manifests import parse_training_run
from kontinue.api.reports import TERMINATION_MESSAGE_BYTES, termination_message
from kontinue.operator.pods import ATTEMPT_LABEL, RUN_LABEL, build_cleanup_pod, build_trainer_pod, pod_problems
from kontinue.operator.reconcile import (Peers, Settings, cleanup_pod, decide, finite_status, parse_allowed_images,
                                         refused_pod, reported_status)
from kontinue.operator.verdicts import FAILED, PENDING, PREEMPTED, RUNNING, SUCCEEDED, judge_pod

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.timezone.utc)
SETTINGS = Settings(image="registry.example/kontinue:1", backoff_base=10, backoff_max=600)


def run_body(**spec) -> dict:
    body = {
        "apiVersion": "kontinue.dev/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": "sst", "namespace": "ml", "uid": "uid-1", "generation": 1},
        "spec": {"task": {"label": "label"}, "data": {"train": "s3://data/sst/train.parquet"},
                 "model": {"hfText": {"checkpoint": "/models/minilm"}},
                 "checkpoint": {"storage": "s3://runs/ckpt", "secretRef": {"name": "s3"}, "intervalSteps": 50},
                 "maxPreemptions": 2, "backoffLimit": 1},
    }
    body["spec"].update(spec)
    return body


def gpu_body() -> dict:
    return run_body(resources={
        "gpus": 2, "cpu": "8", "memory": "32Gi", "nodeSelector": {"cloud.google.com/gke-spot": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "spot-training"})


@pytest.mark.parametrize("body", [run_body(), gpu_body()], ids=["cpu", "gpu"])
def test_trainer_pod_is_a_valid_locked_down_pod(body):
    pod = build_trainer_pod(body, parse_training_run(body), 3, image=SETTINGS.image, grace_seconds=90)
    kubernetes_validate.validate(pod, "1.33.0", strict=True)
    assert pod["metadata"]["name"] == "sst-3"
    assert pod["metadata"]["labels"][RUN_LABEL] == "sst"
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("TrainingRun", "uid-1", True)
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] == 90
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert container["command"] == ["kontinue", "train"]
    assert container["args"][container["args"].index("--run-dir") + 1] == "s3://runs/ckpt/ml/sst/"
    credentials = [e for e in container["env"] if "valueFrom" in e]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in credentials} == {"s3"}
    assert all("value" not in e for e in credentials), "credentials come from the Secret only"
    spec_env = json.loads(next(e["value"] for e in container["env"] if e["name"] == "KONTINUE_SPEC"))
    assert parse_training_run(spec_env).spec == parse_training_run(body).spec


def test_gpu_pod_requests_gpus_and_placement():
    pod = build_trainer_pod(gpu_body(), parse_training_run(gpu_body()), 1, image=SETTINGS.image)
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert pod["spec"]["priorityClassName"] == "spot-training"
    assert pod["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["spec"]["volumes"])


RUNS = {"name": "runs", "claimName": "kontinue-runs", "mountPath": "/runs"}
DATA = {"name": "data", "claimName": "datasets", "mountPath": "/data", "subPath": "nlp", "readOnly": True}


def volume_body(**spec) -> dict:
    """A run with its checkpoints on one claim and its tables on another, mounted read-only."""
    return run_body(**{"data": {"train": "/data/sst/train.parquet", "validation": "file:///data/sst/dev.csv"},
                       "checkpoint": {"storage": "file:///runs/ckpt", "intervalSteps": 50},
                       "volumes": [RUNS, DATA], **spec})


def test_trainer_pod_mounts_the_volumes():
    body = volume_body(resources={"gpus": 1})
    pod = build_trainer_pod(body, parse_training_run(body), 1, image=SETTINGS.image)
    kubernetes_validate.validate(pod, "1.33.0", strict=True)
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    container = pod["spec"]["containers"][0]
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert volumes["runs"]["persistentVolumeClaim"] == {"claimName": "kontinue-runs", "readOnly": False}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "datasets", "readOnly": True}
    assert mounts["runs"] == {"name": "runs", "mountPath": "/runs", "readOnly": False}
    assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True, "subPath": "nlp"}
    assert [mount["mountPath"] for mount in mounts.values()] == ["/scratch", "/tmp", "/dev/shm", "/runs", "/data"]
    assert container["args"][container["args"].index("--run-dir") + 1] == "file:///runs/ckpt/ml/sst/"
    spec_env = json.loads(next(e["value"] for e in container["env"] if e["name"] == "KONTINUE_SPEC"))
    assert "volumes" not in spec_env["spec"], "the pod mounts them; the trainer only opens paths"
    assert pod_problems(parse_training_run(body)) == []


def test_cleanup_pod_sees_what_the_trainer_saw_and_nothing_more():
    body = volume_body(resources={"gpus": 2, "nodeSelector": {"pool": "spot"}, "priorityClassName": "spot"},
                       checkpoint={"storage": "s3://runs/ckpt", "secretRef": {"name": "s3"}})
    run = parse_training_run(body)
    pod, trainer = build_cleanup_pod(body, run, image=SETTINGS.image), build_trainer_pod(body, run, 1, image="x")
    kubernetes_validate.validate(pod, "1.33.0", strict=True)
    container = pod["spec"]["containers"][0]
    assert pod["metadata"]["name"] == "sst-cleanup" and ATTEMPT_LABEL not in pod["metadata"]["labels"]
    assert pod["metadata"]["ownerReferences"] == trainer["metadata"]["ownerReferences"]
    assert container["command"] + container["args"] == ["kontinue", "delete-run-dir", "s3://runs/ckpt/ml/sst/"]
    assert [e for e in container["env"] if "valueFrom" in e] == [e for e in trainer["spec"]["containers"][0]["env"]
                                                                 if "valueFrom" in e]
    assert not any(e["name"] == "KONTINUE_SPEC" for e in container["env"])
    assert "nvidia.com/gpu" not in json.dumps(container["resources"]) and "priorityClassName" not in pod["spec"]
    assert pod["spec"]["nodeSelector"] == {"pool": "spot"}, "where the run's volumes can attach"
    assert container["securityContext"] == trainer["spec"]["containers"][0]["securityContext"]
    assert {v["name"] for v in pod["spec"]["volumes"]} == {v["name"] for v in trainer["spec"]["volumes"]} - {"dshm"}


def problems_of(body: dict) -> dict[str, str]:
    return {problem.path: problem.message for problem in pod_problems(parse_training_run(body))}


@pytest.mark.parametrize("body, field, words", [
    (run_body(checkpoint={"storage": "/runs/ckpt"}), "spec.checkpoint.storage",
     "/runs/ckpt is on no volume: the trainer pod's root filesystem is read-only; mount a PersistentVolumeClaim"),
    (volume_body(checkpoint={"storage": "file:///runs2/ckpt"}), "spec.checkpoint.storage", "on no volume"),
    (volume_body(checkpoint={"storage": "/runs/../etc"}), "spec.checkpoint.storage", "on no volume"),
    (volume_body(checkpoint={"storage": "/data/ckpt"}), "spec.checkpoint.storage",
     "/data/ckpt is on volume data, which is mounted readOnly"),
    (volume_body(data={"train": "/data2/sst/train.parquet"}), "spec.data.train",
     "/data2/sst/train.parquet is on no volume: the trainer pod sees no files but its volumes (data in the "
     "trainer image is not supported)"),
    (volume_body(data={"train": "/data/train.parquet", "test": "file:///srv/test.csv"}), "spec.data.test",
     "file:///srv/test.csv is on no volume"),
])
def test_pod_problems_name_paths_the_pod_cannot_reach(body, field, words):
    problems = problems_of(body)
    assert list(problems) == [field] and words in problems[field], problems


def test_pod_problems_leave_s3_and_mounted_paths_alone():
    assert problems_of(run_body()) == {}  # s3:// storage and data
    assert problems_of(volume_body(checkpoint={"storage": "/runs"}, data={"train": "/data/train.parquet"})) == {}
    mixed = volume_body(checkpoint={"storage": "s3://runs/ckpt", "secretRef": {"name": "s3"}}, volumes=[DATA])
    assert problems_of(mixed) == {}


# -- verdicts ------------------------------------------------------------------------------------

def pod_state(*, phase="Running", terminated=None, waiting=None, conditions=(), deleting=False,
              created=NOW - dt.timedelta(seconds=30), name="sst-1", reason=None) -> dict:
    state = {"terminated": terminated} if terminated else {"waiting": waiting} if waiting else {"running": {}}
    pod = {"metadata": {"name": name, "uid": f"pod-{name}", "creationTimestamp": created.isoformat()},
           "status": {"phase": phase, "conditions": list(conditions),
                      "containerStatuses": [{"name": "trainer", "state": state}]}}
    if deleting:
        pod["metadata"]["deletionTimestamp"] = NOW.isoformat()
    if reason:
        pod["status"]["reason"] = reason
    return pod


def exited(code: int, word: dict | None = None, reason: str = "Error") -> dict:
    return {"exitCode": code, "reason": reason, "message": json.dumps(word) if word else ""}


DISRUPTED = {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
             "message": "preempted by a higher priority pod"}


UNSCHEDULED_POD = {"metadata": {"name": "sst-1", "uid": "pod-sst-1"}, "status": {"phase": "Pending", "conditions": [
    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
     "message": "0/8 nodes are available: 8 Insufficient nvidia.com/gpu."}]}}


@pytest.mark.parametrize("pod, outcome, reason", [
    (pod_state(), RUNNING, "Running"),
    (pod_state(phase="Pending", waiting={"reason": "ContainerCreating"}), PENDING, "ContainerCreating"),
    (pod_state(phase="Succeeded", terminated=exited(0, {"result": "succeeded"}, "Completed")), SUCCEEDED, "Completed"),
    (pod_state(phase="Failed", terminated=exited(75, {"result": "preempted", "step": 40}), conditions=[DISRUPTED]),
     PREEMPTED, "PreemptionByScheduler"),
    # Lightning's exit 0 after SIGTERM must not read as success: the condition decides
    (pod_state(phase="Succeeded", terminated=exited(0), conditions=[DISRUPTED]), PREEMPTED, "PreemptionByScheduler"),
    (pod_state(phase="Failed", terminated=exited(75, {"result": "preempted", "step": 7})), PREEMPTED, "TrainerStopped"),
    (pod_state(phase="Failed", terminated=exited(137, reason="OOMKilled")), FAILED, "OOMKilled"),
    (pod_state(phase="Failed", terminated=exited(143)), PREEMPTED, "KilledBySignal"),
    (pod_state(phase="Failed", terminated=exited(1)), FAILED, "TrainerError"),
    (pod_state(phase="Failed", terminated=exited(2)), FAILED, "InvalidSpec"),
    (pod_state(phase="Succeeded", terminated=exited(0, reason="Completed")), FAILED, "NoResult"),
    (pod_state(phase="Failed", reason="Evicted", terminated=None, waiting={"reason": "x"}), PREEMPTED, "Evicted"),
    (pod_state(phase="Pending", waiting={"reason": "ImagePullBackOff"}), PENDING, "ImagePullBackOff"),
    (pod_state(phase="Pending", waiting={"reason": "ImagePullBackOff"}, created=NOW - dt.timedelta(minutes=6)),
     FAILED, "ImagePullFailed"),
    (pod_state(phase="Pending", waiting={"reason": "InvalidImageName"}), FAILED, "ImagePullFailed"),
    (pod_state(conditions=[DISRUPTED], deleting=True), RUNNING, "Terminating"),
    (UNSCHEDULED_POD, PENDING, "Unschedulable"),
])
def test_verdicts(pod, outcome, reason):
    verdict = judge_pod(pod, NOW, image_pull_timeout=300)
    assert (verdict.outcome, verdict.reason) == (outcome, reason)


# -- decisions -------------------------------------------------------------------------------------

def apply(body: dict, plan) -> dict:
    """What the API server would hold after the operator wrote the plan's status (merge patch)."""
    body = copy.deepcopy(body)
    status = body.setdefault("status", {})
    for key, value in plan.status.items():
        if value is None:
            status.pop(key, None)
        else:
            status[key] = value
    return body


def test_a_new_run_gets_attempt_one_and_its_pod():
    body = run_body()
    plan = decide(body, [], NOW, SETTINGS)
    assert plan.create["metadata"]["name"] == "sst-1"
    assert plan.status["attempt"] == 1 and plan.status["currentPod"] == "sst-1" and plan.status["phase"] == "Pending"
    assert [e[1] for e in plan.events] == ["AttemptStarted"]
    body = apply(body, plan)
    # the operator died after writing the status, before creating the pod: it creates the same pod again
    again = decide(body, [], NOW, SETTINGS)
    assert again.create["metadata"]["name"] == "sst-1" and not again.events


def test_running_then_preempted_then_resumed_once_the_old_pod_is_gone():
    body = apply(run_body(), decide(run_body(), [], NOW, SETTINGS))
    running = pod_state()
    plan = decide(body, [running], NOW, SETTINGS)
    assert plan.status["phase"] == "Running" and [e[1] for e in plan.events] == ["Running"]
    body = apply(body, plan)
    assert decide(body, [running], NOW, SETTINGS).events == []  # no transition, no event

    preempted = pod_state(phase="Failed", terminated=exited(75, {"result": "preempted", "step": 40}),
                          conditions=[DISRUPTED])
    plan = decide(body, [preempted], NOW, SETTINGS)
    assert plan.status["phase"] == "Preempted" and plan.status["preemptions"] == 1
    assert plan.delete == ["sst-1"] and plan.create is None
    assert "after step 40" in plan.events[0][2]
    body = apply(body, plan)
    terminating = copy.deepcopy(preempted)
    terminating["metadata"]["deletionTimestamp"] = NOW.isoformat()
    waiting = decide(body, [terminating], NOW, SETTINGS)
    assert waiting.create is None and waiting.requeue_after, "never two trainer pods for one run"
    plan = decide(body, [], NOW, SETTINGS)
    assert plan.create["metadata"]["name"] == "sst-2" and plan.status["attempt"] == 2
    assert plan.status.get("preemptions") is None  # counted once only


def test_preemptions_beyond_the_limit_fail_the_run():
    body = run_body()
    body["status"] = {"attempt": 3, "currentPod": "sst-3", "podUid": "pod-sst-3", "preemptions": 2,
                      "phase": "Running"}
    plan = decide(body, [pod_state(name="sst-3", phase="Failed", terminated=exited(143))], NOW, SETTINGS)
    assert plan.status["phase"] == "Failed"
    assert plan.status["conditions"][-1]["reason"] == "TooManyPreemptions"
    assert "spec.maxPreemptions" in plan.status["message"]


def test_failures_back_off_then_fail_with_the_reason_while_preemptions_do_not_count():
    body = run_body()
    body["status"] = {"attempt": 1, "currentPod": "sst-1", "podUid": "pod-sst-1", "phase": "Running",
                      "preemptions": 2}
    crashed = pod_state(phase="Failed", terminated=exited(1, reason="Error"))
    plan = decide(body, [crashed], NOW, SETTINGS)
    assert plan.status["failures"] == 1 and plan.status["nextAttemptTime"] == "2026-11-22T12:00:10Z"
    assert plan.requeue_after == 10 and plan.delete == ["sst-1"]
    body = apply(body, plan)
    assert decide(body, [], NOW + dt.timedelta(seconds=5), SETTINGS).create is None  # still backing off
    plan = decide(body, [], NOW + dt.timedelta(seconds=11), SETTINGS)
    assert plan.create["metadata"]["name"] == "sst-2"
    body = apply(body, plan)
    body["status"]["podUid"] = "pod-sst-2"
    plan = decide(body, [pod_state(name="sst-2", phase="Failed", terminated=exited(137, reason="OOMKilled"))],
                  NOW, SETTINGS)
    assert plan.status["phase"] == "Failed" and plan.status["failures"] == 2
    failed = next(c for c in plan.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "OOMKilled" and "spec.resources.memory" in failed["message"]


def test_a_pod_that_vanishes_is_a_preemption_after_a_grace_period_for_its_last_state():
    body = run_body()
    body["status"] = {"attempt": 1, "currentPod": "sst-1", "podUid": "pod-sst-1", "phase": "Running"}
    plan = decide(body, [], NOW, SETTINGS)
    assert plan.status["podGoneTime"] == "2026-11-22T12:00:00Z" and plan.requeue_after == 10 and not plan.events
    body = apply(body, plan)
    assert decide(body, [], NOW + dt.timedelta(seconds=4), SETTINGS).requeue_after == 6
    plan = decide(body, [], NOW + dt.timedelta(seconds=10), SETTINGS)
    assert plan.status["preemptions"] == 1 and plan.events[0][1:] == (
        "Preempted", "pod sst-1 was preempted (PodDeleted); the next attempt resumes from the last checkpoint", 1)
    assert plan.create["metadata"]["name"] == "sst-2", "the old pod is gone: the next attempt starts at once"
    assert plan.status["attempt"] == 2 and plan.status["podGoneTime"] is None
    assert [e[1::2] for e in plan.events] == [("Preempted", 1), ("AttemptStarted", 2)]


def test_a_deleted_pod_is_judged_by_its_last_state_and_the_next_attempt_resumes_where_it_stopped():
    body = run_body()
    body["status"] = {"attempt": 1, "currentPod": "sst-1", "podUid": "pod-sst-1", "phase": "Running",
                      "lastCheckpoint": {"uri": "s3://runs/ckpt/ml/sst/last.ckpt", "step": 30}}
    checkpoint = {"uri": "s3://runs/ckpt/ml/sst/last.ckpt", "step": 42}
    last_state = pod_state(phase="Failed", conditions=[DISRUPTED], deleting=True, terminated=exited(
        75, {"result": "preempted", "step": 42, "checkpoint": checkpoint}))
    plan = decide(body, [], NOW, SETTINGS, last_seen=last_state)
    assert plan.verdict.reason == "PreemptionByScheduler" and plan.status["preemptions"] == 1
    assert plan.status["lastCheckpoint"] == checkpoint and plan.create["metadata"]["name"] == "sst-2"
    assert plan.events[-1][2] == "attempt 2: created pod sst-2, resuming from s3://runs/ckpt/ml/sst/last.ckpt (step 42)"
    # the last state of a pod that is not the current one tells nothing
    other = decide(body, [], NOW, SETTINGS, last_seen=pod_state(name="sst-0", terminated=exited(0)))
    assert other.status["podGoneTime"] == "2026-11-22T12:00:00Z" and other.create is None


def test_a_pod_waiting_for_a_node_says_why_in_the_status():
    body = run_body()
    body["status"] = {"attempt": 1, "currentPod": "sst-1", "podUid": "pod-sst-1", "phase": "Pending"}
    plan = decide(body, [UNSCHEDULED_POD], NOW, SETTINGS)
    assert plan.status["message"] == "pod sst-1: Unschedulable 0/8 nodes are available: 8 Insufficient nvidia.com/gpu."
    running = next(c for c in plan.status["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "Unschedulable") and not plan.events
    body = apply(body, plan)
    again = decide(body, [UNSCHEDULED_POD], NOW, SETTINGS).status
    assert all(body["status"].get(key) == value for key, value in again.items()), "said once"


def test_a_refused_pod_is_reported_and_tried_again_without_counting_as_a_failure():
    body = apply(run_body(), decide(run_body(), [], NOW, SETTINGS))
    plan = refused_pod(body, "sst-1", 'pods "sst-1" is forbidden: exceeded quota: gpus', NOW, SETTINGS)
    assert plan.status["message"].startswith('the API server refused pod sst-1: pods "sst-1" is forbidden')
    assert plan.requeue_after == SETTINGS.backoff_base and [e[1] for e in plan.events] == ["PodCreateFailed"]
    assert "failures" not in plan.status and plan.status["phase"] == "Pending"
    body = apply(body, plan)
    assert not refused_pod(body, "sst-1", 'pods "sst-1" is forbidden: exceeded quota: gpus', NOW, SETTINGS).status
    again = decide(body, [], NOW, SETTINGS)
    assert again.create["metadata"]["name"] == "sst-1", "the same attempt's pod, once the quota allows"


def test_a_pending_image_pull_is_looked_at_again_when_its_time_out_is_due():
    body = run_body()
    body["status"] = {"attempt": 1, "currentPod": "sst-1", "podUid": "pod-sst-1", "phase": "Pending"}
    pulling = pod_state(phase="Pending", waiting={"reason": "ImagePullBackOff"}, created=NOW - dt.timedelta(seconds=100))
    plan = decide(body, [pulling], NOW, SETTINGS)
    assert plan.create is None and plan.requeue_after == pytest.approx(SETTINGS.image_pull_timeout - 100)


def test_an_invalid_spec_fails_the_run_naming_the_field_once():
    body = run_body(hyperparameters={"optim.lrr": 0.1})
    plan = decide(body, [], NOW, SETTINGS)
    assert plan.status["phase"] == "Failed" and plan.create is None
    assert "spec.hyperparameters.optim.lrr" in plan.status["message"]
    assert [e[1] for e in plan.events] == ["InvalidSpec"]
    assert decide(apply(body, plan), [], NOW, SETTINGS).status == {}


def test_a_trainer_that_refuses_its_spec_fails_the_run_at_once_without_retries():
    """Exit code 2: the trainer cannot run this spec (a family it lacks, no usable column); another
    attempt would be refused the same way, whatever spec.backoffLimit allows."""
    body = run_body()
    body["status"] = {"attempt": 1, "currentPod": "sst-1", "podUid": "pod-sst-1", "phase": "Running"}
    refused = pod_state(phase="Failed", terminated={
        "exitCode": 2, "reason": "Error", "message": "invalid input: data: no column any model can use"})
    plan = decide(body, [refused], NOW, SETTINGS)
    assert plan.status["phase"] == "Failed" and plan.create is None and "nextAttemptTime" not in plan.status
    assert plan.status["failures"] == 1 and "no column any model can use" in plan.status["message"]
    failed = next(c for c in plan.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert [e[1] for e in plan.events] == ["Failed"]


def test_a_run_whose_storage_no_volume_holds_fails_as_an_invalid_spec():
    body = run_body(checkpoint={"storage": "/runs/ckpt"})
    plan = decide(body, [], NOW, SETTINGS)
    assert plan.status["phase"] == "Failed" and plan.create is None
    failed = next(c for c in plan.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and failed["message"] == plan.status["message"]
    assert "spec.checkpoint.storage: /runs/ckpt is on no volume" in failed["message"]
    assert [e[1] for e in plan.events] == ["InvalidSpec"]
    assert decide(apply(body, plan), [], NOW, SETTINGS).status == {}


def test_success_records_the_trainer_result():
    body = run_body()
    body["status"] = {"attempt": 2, "currentPod": "sst-2", "podUid": "pod-sst-2", "phase": "Running",
                      "lastCheckpoint": {"step": 40}}
    word = {"result": "succeeded", "model": "s3://runs/ckpt/ml/sst/model.ckpt",
            "dump": "s3://runs/ckpt/ml/sst/dump", "scores": {"accuracy": 0.8}, "test_scores": {"accuracy": 0.79}}
    plan = decide(body, [pod_state(name="sst-2", phase="Succeeded", terminated=exited(0, word, "Completed"))],
                  NOW, SETTINGS)
    assert plan.status["phase"] == "Succeeded" and plan.delete == []
    assert plan.status["metrics"] == {"accuracy": 0.8, "test_accuracy": 0.79}
    assert plan.status["dumpedModelUri"].endswith("/dump") and plan.status["lastCheckpoint"] is None
    assert {c["type"]: c["status"] for c in plan.status["conditions"]}["Succeeded"] == "True"


# -- TransferRuns and the runs they depend on --------------------------------------------------------

def transfer_body(**spec) -> dict:
    body = run_body(**spec)
    body["kind"], body["metadata"]["name"] = "TransferRun", "sst-lengths"
    del body["spec"]["model"]
    body["spec"]["source"] = {"trainingRun": "sst"}
    return body


def test_a_transfer_run_waits_for_its_source_then_starts_like_a_training_run():
    body = transfer_body()
    for phase in (None, "Running"):
        plan = decide(body, [], NOW, SETTINGS, peers=Peers(source_phase=phase))
        assert plan.create is None and plan.requeue_after == 30 and plan.status["phase"] == "Pending"
        assert plan.status["message"] == f"waiting for TrainingRun sst to succeed (it is {phase or 'not there yet'})"
        assert next(c for c in plan.status["conditions"] if c["type"] == "Running")["reason"] == "WaitingForSource"
    plan = decide(apply(body, plan), [], NOW, SETTINGS, peers=Peers(source_phase="Succeeded"))
    assert plan.create["metadata"]["name"] == "sst-lengths-1" and plan.status["attempt"] == 1
    spec = json.loads(next(e["value"] for e in plan.create["spec"]["containers"][0]["env"] if e["name"] == "KONTINUE_SPEC"))
    assert spec["kind"] == "TransferRun" and plan.create["metadata"]["ownerReferences"][0]["kind"] == "TransferRun"


def test_a_transfer_run_whose_source_failed_fails():
    plan = decide(transfer_body(), [], NOW, SETTINGS, peers=Peers(source_phase="Failed"))
    assert plan.status["phase"] == "Failed" and plan.create is None
    assert [e[1] for e in plan.events] == ["SourceFailed"]


def test_runs_of_both_kinds_with_one_name_would_share_a_directory_and_are_refused():
    plan = decide(run_body(), [], NOW, SETTINGS, peers=Peers(namesake="TransferRun"))
    assert plan.status["phase"] == "Failed" and plan.create is None
    assert "metadata.name: a TransferRun named sst exists in this namespace" in plan.status["message"]
    started = run_body()
    started["status"] = {"attempt": 1, "currentPod": "sst-1", "podUid": "pod-sst-1", "phase": "Running"}
    assert decide(started, [pod_state()], NOW, SETTINGS).status.get("phase") is None, \
        "a run that started keeps its directory: only the newcomer is refused"


# -- hardening: a spec fixed once started, images allowed, pods never left running, finite status ------

def started(body: dict, pods=None, **status) -> tuple[dict, list]:
    """`body` as the operator leaves it after starting attempt 1 (digest recorded), with a running pod."""
    body = apply(body, decide(body, [], NOW, SETTINGS))
    body["status"].update(podUid="pod-sst-1", phase="Running", **status)
    return body, [pod_state()] if pods is None else pods


def condition(plan, kind: str) -> dict:
    return next(c for c in plan.status["conditions"] if c["type"] == kind)


def test_the_first_attempt_pins_the_digest_of_the_immutable_fields():
    body = run_body(hyperparameters={"optim.lr": 0.1}, seed=3)
    plan = decide(body, [], NOW, SETTINGS)
    spec = parse_training_run(body).spec
    assert plan.status["specDigest"] == spec_digest(spec)
    # what the spec sets (resources.gpus is left at its default: as good as absent)
    assert set(plan.status["specFieldDigests"]) == {"task", "data", "model", "hyperparameters", "seed",
                                                    "checkpoint.storage"}
    body = apply(body, plan)
    body["status"].update(currentPod=None, phase="Preempted")  # attempt 2 keeps the first attempt's digest
    assert "specDigest" not in decide(body, [], NOW, SETTINGS).status
    # a run started by an operator that recorded none adopts the spec it sees
    del body["status"]["specDigest"], body["status"]["specFieldDigests"]
    assert decide(body, [], NOW, SETTINGS).status["specDigest"] == spec_digest(spec)


@pytest.mark.parametrize("edit", [
    {"maxPreemptions": 7, "backoffLimit": 0, "deleteRunDirectory": True, "dumpModel": False},
    {"resources": {"cpu": "4", "memory": "8Gi", "nodeSelector": {"pool": "spot"}, "priorityClassName": "low"}},
    {"resources": {"gpus": 0}},  # written out as its default
    {"checkpoint": {"storage": "s3://runs/ckpt", "secretRef": {"name": "s3-rotated"}, "intervalSteps": 10,
                    "intervalMinutes": 5}},
    {"image": SETTINGS.image},
], ids=["limits", "placement", "default gpus", "checkpoint cadence and secret", "image"])
def test_safe_edits_of_a_started_run_go_on(edit):
    body, pods = started(run_body())
    body["spec"].update(edit)
    plan = decide(body, pods, NOW, SETTINGS)
    assert plan.delete == [] and plan.status.get("phase") is None and not plan.events


def test_an_immutable_field_changed_mid_run_stops_the_pod_and_fails_the_run_naming_the_fields():
    """A CRD installed without the transition rules, or validation bypassed: the new spec must not
    run against the old directory."""
    body, pods = started(run_body())
    body["spec"].update(seed=1, hyperparameters={"optim.lr": 0.5})
    plan = decide(body, pods, NOW, SETTINGS)
    assert plan.delete == ["sst-1"] and plan.create is None
    assert plan.status["phase"] == "Failed" and plan.status["currentPod"] is None
    failed = condition(plan, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "SpecChanged")
    assert condition(plan, "Running")["reason"] == "SpecChanged"
    assert plan.status["message"].startswith(
        "spec.hyperparameters, spec.seed changed after the run started (attempt 1)")
    assert "pod sst-1 is stopped" in plan.status["message"] and "create a new run" in plan.status["message"]
    assert [e[:2] for e in plan.events] == [("Warning", "SpecChanged")]
    body = apply(body, plan)
    stopping = copy.deepcopy(pods[0])
    stopping["metadata"]["deletionTimestamp"] = NOW.isoformat()
    again = decide(body, [stopping], NOW, SETTINGS)
    assert again.status == {} and again.delete == [] and not again.events
    # its delete was lost (the operator stopped in between): the ended run still stops it
    assert decide(body, pods, NOW, SETTINGS).delete == ["sst-1"]


@pytest.mark.parametrize("edit, named", [
    ({"resources": {"gpus": 2}}, "spec.resources.gpus"),
    ({"checkpoint": {"storage": "s3://runs/elsewhere", "secretRef": {"name": "s3"}}}, "spec.checkpoint.storage"),
    ({"model": {"hfText": {"checkpoint": "/models/other"}}}, "spec.model"),
    ({"timeLimit": "1h"}, "spec.timeLimit"),
    ({"task": {"label": "label", "evalMetric": "acc"}}, "spec.task"),
])
def test_each_immutable_field_is_named_when_it_changes_between_attempts(edit, named):
    body, _ = started(run_body())
    body["status"].update(currentPod=None, podUid=None, phase="Preempted", preemptions=1)
    body["spec"].update(edit)
    plan = decide(body, [], NOW, SETTINGS)
    assert plan.create is None and plan.status["phase"] == "Failed"
    assert plan.status["message"].startswith(f"{named} changed after the run started")


def test_a_spec_that_turns_invalid_mid_run_stops_its_pods():
    body, pods = started(run_body())
    pending = pod_state(name="sst-0", phase="Pending", waiting={"reason": "ContainerCreating"})
    body["spec"]["hyperparameters"] = {"optim.lrr": 0.1}
    plan = decide(body, pods + [pending], NOW, SETTINGS)
    assert sorted(plan.delete) == ["sst-0", "sst-1"], "no GPU pod left running unaccounted for"
    assert plan.status["phase"] == "Failed" and condition(plan, "Failed")["reason"] == "InvalidSpec"
    assert plan.status["currentPod"] is None and [e[1] for e in plan.events] == ["InvalidSpec"]
    body = apply(body, plan)
    assert decide(body, pods, NOW, SETTINGS).delete == ["sst-1"], "stopped on every look until it is gone"
    finished = pod_state(phase="Failed", terminated=exited(143))
    assert decide(body, [finished], NOW, SETTINGS).delete == [] and decide(body, [], NOW, SETTINGS).status == {}
    # unparseable altogether (a CRD without validation): the same
    broken, pods = started(run_body())
    broken["spec"]["resources"] = "lots"
    plan = decide(broken, pods, NOW, SETTINGS)
    assert plan.delete == ["sst-1"] and condition(plan, "Failed")["reason"] == "InvalidSpec"


def test_a_run_that_succeeded_keeps_its_outcome_whatever_its_spec_becomes():
    body = run_body(hyperparameters={"optim.lrr": 0.1})
    body["status"] = {"attempt": 1, "phase": "Succeeded", "message": "attempt 1 finished training"}
    done = pod_state(phase="Succeeded", terminated=exited(0, {"result": "succeeded"}, "Completed"))
    plan = decide(body, [done], NOW, SETTINGS)
    assert plan.status == {} and plan.delete == [] and not plan.events


def test_an_image_nobody_allowed_fails_the_run_before_any_pod():
    body = run_body(image="docker.io/attacker/miner:latest")
    plan = decide(body, [], NOW, SETTINGS)
    assert plan.create is None and plan.status["phase"] == "Failed" and "attempt" not in plan.status
    failed = condition(plan, "Failed")
    assert failed["reason"] == "ImageNotAllowed" and failed["message"] == plan.status["message"] == (
        "spec.image docker.io/attacker/miner:latest is not allowed: this operator runs only images matching "
        "registry.example/kontinue:1 (its --allowed-images)")
    assert [e[:2] for e in plan.events] == [("Warning", "ImageNotAllowed")]
    assert decide(apply(body, plan), [], NOW, SETTINGS).status == {}


def test_allowed_images_are_globs_and_the_default_image_is_always_allowed():
    settings = Settings(image="registry.example/kontinue:1",
                        allowed_images=parse_allowed_images(" registry.example/kontinue:* , ,ghcr.io/team/*"))
    assert settings.allowed_images == ("registry.example/kontinue:*", "ghcr.io/team/*")
    for image, allowed in [("registry.example/kontinue:2", True), ("ghcr.io/team/trainer:1", True),
                           ("registry.example/kontinue:1", True), ("registry.example/other:1", False),
                           ("registry.example/kontinue@sha256:ab", False),
                           ("evil.io/registry.example/kontinue:1", False)]:
        assert settings.image_allowed(image) is allowed, image
    plan = decide(run_body(image="registry.example/kontinue:2"), [], NOW, settings)
    assert plan.create["spec"]["containers"][0]["image"] == "registry.example/kontinue:2"
    assert decide(run_body(), [], NOW, Settings(image="x/y:1")).create["spec"]["containers"][0]["image"] == "x/y:1"
    assert parse_allowed_images(None) == () and parse_allowed_images("") == ()


def test_an_image_no_longer_allowed_stops_a_running_run():
    body, pods = started(run_body(image="registry.example/kontinue:2"))
    plan = decide(body, pods, NOW, SETTINGS)  # the operator came back with a narrower list
    assert plan.delete == ["sst-1"] and condition(plan, "Failed")["reason"] == "ImageNotAllowed"


def test_the_cleanup_pod_runs_only_an_allowed_image():
    allowing = Settings(image=SETTINGS.image, allowed_images=("registry.example/*",))
    for image, settings, expected in [(None, SETTINGS, SETTINGS.image),
                                      ("registry.example/custom:3", allowing, "registry.example/custom:3"),
                                      ("registry.example/custom:3", SETTINGS, SETTINGS.image)]:
        body = run_body(**({"image": image} if image else {}))
        pod = cleanup_pod(body, parse_training_run(body), settings)
        assert pod["spec"]["containers"][0]["image"] == expected
        assert pod["spec"]["containers"][0]["command"] == ["kontinue", "delete-run-dir"]


def test_nan_and_infinite_numbers_never_reach_a_status_write():
    nan, inf = float("nan"), float("inf")
    report = {"progress": nan, "metrics": {"val_loss": nan, "val_acc": 0.5, "train_loss": -inf},
              "bestCheckpoint": {"uri": "s3://runs/ckpt/ml/sst/model.ckpt", "score": inf, "metric": "acc"},
              "lastCheckpoint": {"uri": "s3://runs/ckpt/ml/sst/last.ckpt", "step": 9}, "warnings": ["slow loader"]}
    held = {"metrics": {"val_loss": 0.7, "val_acc": 0.4}, "bestCheckpoint": {"score": 0.6, "uri": "x"},
            "progress": "40%", "progressRatio": 0.4}
    update = reported_status(report, held)
    json.dumps(update, allow_nan=False)  # what the API server accepts
    assert update["metrics"] == {"val_loss": None, "val_acc": 0.5}, "None: the merge patch removes the stale value"
    assert update["bestCheckpoint"] == {"uri": "s3://runs/ckpt/ml/sst/model.ckpt", "score": None, "metric": "acc"}
    assert "progress" not in update and "progressRatio" not in update
    assert update["warnings"][0] == "slow loader"
    assert sorted(w.split(" (")[0] for w in update["warnings"][1:]) == [
        "bestCheckpoint.score is inf", "metric train_loss is -inf", "metric val_loss is NaN", "progress is NaN"]
    status = {**held, **update, "metrics": {"val_acc": 0.5},  # as the merge patch leaves it
              "bestCheckpoint": {"uri": "s3://runs/ckpt/ml/sst/model.ckpt", "metric": "acc"}}
    assert reported_status(report, status) == {}, "said once, not on every refresh"
    # the loss is finite again: its warning goes, the trainer's stay
    healed = reported_status({**report, "progress": 0.5, "metrics": {"val_loss": 0.3, "val_acc": 0.5},
                              "bestCheckpoint": {"score": 0.9}}, status)
    assert healed["warnings"] == ["slow loader"] and healed["metrics"] == {"val_loss": 0.3, "val_acc": 0.5}
    assert finite_status({"progressRatio": nan}, {}) == {
        "warnings": ["progressRatio is NaN (JSON cannot carry it: left out of the status)"]}


def test_a_success_with_a_nan_score_records_the_rest():
    body = run_body()
    body["status"] = {"attempt": 1, "currentPod": "sst-1", "podUid": "pod-sst-1", "phase": "Running"}
    word = {"result": "succeeded", "scores": {"accuracy": 0.8, "log_loss": float("nan")},
            "test_scores": {"accuracy": float("inf")}}
    plan = decide(body, [pod_state(phase="Succeeded", terminated={
        "exitCode": 0, "reason": "Completed", "message": json.dumps(word)})], NOW, SETTINGS)
    assert plan.status["phase"] == "Succeeded" and plan.status["metrics"] == {"accuracy": 0.8}
    assert len(plan.status["warnings"]) == 2 and "metric log_loss is NaN" in plan.status["warnings"][0]
    json.dumps(plan.status, allow_nan=False)


def test_a_success_whose_strict_termination_message_names_nan_records_the_rest():
    """The trainer writes NaN as "NaN" (strict JSON); the operator reads it as NaN, never as a string
    for a number field of the CRD, and leaves it out with the usual warning."""
    body = run_body()
    body["status"] = {"attempt": 1, "currentPod": "sst-1", "podUid": "pod-sst-1", "phase": "Running"}
    word = {"result": "succeeded", "step": 90, "model": "s3://runs/ckpt/ml/sst/model.ckpt",
            "scores": {"accuracy": 0.8, "log_loss": float("nan"),
                       **{f"recall_{index:04d}": 0.5 for index in range(1000)}},
            "test_scores": {"accuracy": float("-inf")}, "message": "ü" * 5000}
    message = termination_message(word)
    assert len(message) <= TERMINATION_MESSAGE_BYTES and "NaN" in json.loads(message)["scores"].values()
    plan = decide(body, [pod_state(phase="Succeeded", terminated={
        "exitCode": 0, "reason": "Completed", "message": message.decode()})], NOW, SETTINGS)
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["bestCheckpoint"]["uri"] == "s3://runs/ckpt/ml/sst/model.ckpt"
    metrics = plan.status["metrics"]
    assert metrics["accuracy"] == 0.8 and "log_loss" not in metrics and "test_accuracy" not in metrics
    assert 10 < len(metrics) < 1000 and all(isinstance(value, float) for value in metrics.values())
    assert [w.split(" (")[0] for w in plan.status["warnings"]] == [
        "metric log_loss is NaN", "metric test_accuracy is -inf"]
    json.dumps(plan.status, allow_nan=False)


def test_a_preemption_with_a_shortened_termination_message_keeps_its_resume_point():
    body = run_body()
    body["status"] = {"attempt": 1, "currentPod": "sst-1", "podUid": "pod-sst-1", "phase": "Running"}
    checkpoint = {"uri": "s3://runs/ckpt/ml/sst/last.ckpt", "step": 40, "sha256": "ab" * 32}
    message = termination_message({"result": "preempted", "step": 40, "checkpoint": checkpoint,
                                   "scores": {f"m{index}": float("inf") for index in range(2000)}})
    plan = decide(body, [pod_state(phase="Failed", terminated=exited(75) | {"message": message.decode()})],
                  NOW, SETTINGS)
    assert plan.status["phase"] == "Preempted" and plan.status["lastCheckpoint"] == checkpoint
    assert "after step 40" in plan.status["message"]


def test_status_fields_the_crd_does_not_declare_are_caught_before_the_api_server_drops_them():
    from kontinue.operator.reconcile import undeclared_status_fields

    assert undeclared_status_fields("TrainingRun", {"podUid": "u", "phase": "Running", "specDigest": "d"}) == []
    assert undeclared_status_fields("TrainingRun", {"podUID": "u", "sourceDumpUri": "s3://b/d"}) == ["podUID", "sourceDumpUri"]
    assert undeclared_status_fields("TransferRun", {"sourceDumpUri": "s3://b/d"}) == []


def test_trainer_pods_leave_a_lost_node_after_node_lost_seconds_unless_the_spec_says_otherwise():
    pod = build_trainer_pod(run_body(), parse_training_run(run_body()), 1, image="x", node_lost_seconds=45)
    lost = {t["key"]: t for t in pod["spec"]["tolerations"]}
    assert set(lost) == {"node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready"}
    assert all(t["effect"] == "NoExecute" and t["tolerationSeconds"] == 45 for t in lost.values())
    patient = run_body(resources={"tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                                                   "effect": "NoExecute", "tolerationSeconds": 600}]})
    pod = build_trainer_pod(patient, parse_training_run(patient), 1, image="x", node_lost_seconds=45)
    assert [(t["key"], t["tolerationSeconds"]) for t in pod["spec"]["tolerations"]] == [
        ("node.kubernetes.io/unreachable", 600), ("node.kubernetes.io/not-ready", 45)]


def test_a_pod_left_terminating_on_a_lost_node_is_deleted_for_good_then_counted_as_a_preemption():
    body, _ = started(run_body())
    evicted = {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
               "message": "Taint manager: deleting due to NoExecute taint"}
    stranded = pod_state(conditions=[evicted], deleting=True)  # its grace period ends at NOW
    settings = Settings(image=SETTINGS.image, node_lost_seconds=20)
    waiting = decide(body, [stranded], NOW + dt.timedelta(seconds=5), settings)
    assert waiting.force_delete == [] and waiting.create is None and waiting.requeue_after == 15
    plan = decide(body, [stranded], NOW + dt.timedelta(seconds=21), settings)
    assert plan.force_delete == ["sst-1"] and plan.create is None
    assert [(e[0], e[1]) for e in plan.events] == [("Warning", "NodeLost")] and "21s" in plan.events[0][2]
    gone = decide(apply(body, plan), [], NOW + dt.timedelta(seconds=22), settings, last_seen=stranded)
    assert gone.status["preemptions"] == 1 and gone.verdict.reason == "DeletionByTaintManager"


def test_the_spec_digest_counts_what_was_set_not_how_defaults_were_written():
    from kontinue.api.identity import canonical

    explicit = parse_training_run(run_body(seed=0, resources={"gpus": 0}, maxPreemptions=2)).spec
    implicit = parse_training_run(run_body()).spec
    assert canonical(explicit) == canonical(implicit) and spec_digest(explicit) == spec_digest(implicit)
    assert spec_digest(parse_training_run(run_body(seed=1)).spec) != spec_digest(implicit)
