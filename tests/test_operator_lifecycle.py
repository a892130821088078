"""The operator's life cycle end to end: failures and their back-off, OOM and image pulls, the
operator killed and restarted mid-flow, invalid specs, deletion, status columns, probes, metrics.

Every test runs the real `kontinue operator` process, with the RBAC it ships, against a real API
server, with the harness kubelet running pods as local processes (the real trainer unless a test
overrides the command).
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import time
from pathlib import Path

import pytest
import requests

from tests.kube_fixtures import ApiError
from tests.operator_helpers import (OPERATOR_ARGS, SLEEPER, assert_one_pod_at_a_time, local_trainer_status,
                                    pod_lifetimes, preempt_after_checkpoint, run_status, tables_on_claim,
                                    transition_reasons)
from tests.trainer_fixtures import training_run

FINISHED = ("Succeeded", "Failed")


def parse_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def conditions_of(status: dict) -> dict[str, dict]:
    return {condition["type"]: condition for condition in status.get("conditions") or []}


def wait_finished(kube, name: str, timeout: float = 180) -> dict:
    kube.wait_for(lambda: run_status(kube, name).get("phase") in FINISHED, timeout, f"run {name} to finish")
    return run_status(kube, name)


def run_history(kube, name: str) -> list[dict]:
    """Every version of the run's status, oldest first."""
    return [version.get("status") or {} for version in kube.history("trainingruns", kube.namespace, name) if version]


def created(kube, pod: str) -> dt.datetime:
    """When the (first) pod of that name was created, even if it is gone."""
    return next(parse_time(version["metadata"]["creationTimestamp"])
                for version in kube.history("pods", kube.namespace, pod) if version)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def manifest_in(kube, kubelet, tiny_bert, review_tables):
    """A TrainingRun checkpointing onto a PersistentVolumeClaim (mounted at /runs) with its data on
    another (/data), and its run directory as this machine sees it."""
    data, data_volume = tables_on_claim(kubelet, review_tables)
    runs_volume = {"name": "runs", "claimName": "runs", "mountPath": "/runs"}

    def make(name: str, **spec) -> tuple[dict, Path]:
        manifest = training_run(name, "/runs", data, tiny_bert, volumes=[data_volume, runs_volume], **spec)
        manifest["metadata"]["namespace"] = kube.namespace
        return manifest, kubelet.claim_dir("runs") / kube.namespace / name
    return make


# -- failures ------------------------------------------------------------------------------------

def test_code_failures_use_the_backoff_limit_preemptions_do_not_and_operator_kills_change_nothing(
        kube, kubelet, operator_process, manifest_in):
    """backoffLimit 2: one preemption, then three attempts failing in code -> Failed, with the
    operator SIGKILLed while a pod runs, across the preemption and during a back-off."""
    manifest, _ = manifest_in("flaky", backoffLimit=2)
    missing = f"{manifest['spec']['data']['train']}.missing.parquet"
    manifest["spec"]["data"] = {**manifest["spec"]["data"], "train": missing}  # not the shared dict
    operator_process.start(*OPERATOR_ARGS[:-1], "3")  # back-off 3 s, then 6 s
    kubelet.override_command("flaky", SLEEPER)
    kube.create(manifest)

    # Attempt 1 runs; the operator dies; the pod is preempted while no operator watches.
    kube.wait_for(lambda: run_status(kube, "flaky").get("phase") == "Running", 60, "attempt 1 to run")
    kubelet.override_command("flaky", None)  # later attempts run `kontinue train` on a missing file
    operator_process.kill()
    kubelet.preempt("flaky-1")
    operator_process.start(*OPERATOR_ARGS[:-1], "3")

    # Attempt 2 fails in code; the operator dies during the back-off and misses its deadline.
    kube.wait_for(lambda: run_status(kube, "flaky").get("failures") == 1, 90, "the first failure")
    status = run_status(kube, "flaky")
    assert status.get("preemptions") == 1 and status["phase"] == "Pending", status
    assert conditions_of(status)["Running"]["reason"] == "BackOff"
    first_retry = parse_time(status["nextAttemptTime"])
    assert first_retry > dt.datetime.now(dt.timezone.utc), "the kill must fall into the back-off"
    operator_process.kill()
    time.sleep(max(0.0, (first_retry - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 1)
    assert kube.get("pods", kube.namespace, "flaky-3") is None
    operator_process.start(*OPERATOR_ARGS[:-1], "3")

    status = wait_finished(kube, "flaky")
    assert status["phase"] == "Failed", status
    assert (status["failures"], status["preemptions"], status["attempt"]) == (3, 1, 4), status
    failed = conditions_of(status)["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "TrainerError", failed
    assert "gave up after 3 failures (spec.backoffLimit is 2)" in failed["message"]
    assert "FileNotFoundError" in failed["message"] or "No such file" in failed["message"], failed
    assert missing.rsplit("/", 1)[-1] in failed["message"], "the message names the trainer's error"
    assert status["message"] == failed["message"]
    assert conditions_of(status)["Running"]["status"] == "False"
    assert "Succeeded" not in conditions_of(status)

    # Back-off: each retry waited for nextAttemptTime; the one the operator was up for came on time.
    retries = [parse_time(s["nextAttemptTime"]) for s in run_history(kube, "flaky") if s.get("nextAttemptTime")]
    retries = sorted(set(retries))
    assert len(retries) == 2, retries
    for retry, pod in zip(retries, ("flaky-3", "flaky-4")):
        assert created(kube, pod) >= retry, f"{pod} was created before its back-off ended at {retry}"
    assert (created(kube, "flaky-4") - retries[1]).total_seconds() <= 3, \
        "the retry must come when the back-off ends (the operator was up for that one)"
    assert (retries[1] - retries[0]).total_seconds() >= 6, "the back-off doubles"

    assert transition_reasons(kube, "flaky") == [
        "AttemptStarted", "Running", "Preempted",
        "AttemptStarted", "Running", "AttemptFailed",
        "AttemptStarted", "Running", "AttemptFailed",
        "AttemptStarted", "Running", "Failed"], kube.dump()
    assert_one_pod_at_a_time(kube, kubelet, "flaky", ["flaky-1", "flaky-2", "flaky-3", "flaky-4"])
    kube.wait_for(lambda: kube.list("pods", kube.namespace) == [], 30, "the failed pod to be deleted")
    assert operator_process.running


def test_oom_kill_and_unpullable_image_are_failures_with_their_reason(kube, kubelet, operator_process, manifest_in):
    operator_process.start(*OPERATOR_ARGS, "--image-pull-timeout", "2", "--allowed-images", "kontinue:test,registry.invalid/*")
    oom, _ = manifest_in("oom", backoffLimit=0)
    pull, _ = manifest_in("pull", backoffLimit=1, image="registry.invalid/kontinue:none")
    kubelet.override_command("oom", SLEEPER)
    kube.create(oom)
    kube.create(pull)

    kube.wait_for(lambda: run_status(kube, "oom").get("phase") == "Running", 60, "the oom run to start")
    kubelet.oom("oom-1")
    status = wait_finished(kube, "oom", 60)
    assert (status["phase"], status["failures"], status.get("preemptions", 0)) == ("Failed", 1, 0), status
    failed = conditions_of(status)["Failed"]
    assert failed["reason"] == "OOMKilled" and "raise spec.resources.memory" in failed["message"], failed
    assert transition_reasons(kube, "oom") == ["AttemptStarted", "Running", "Failed"]

    status = wait_finished(kube, "pull", 60)
    assert (status["phase"], status["failures"], status["attempt"]) == ("Failed", 2, 2), status
    failed = conditions_of(status)["Failed"]
    assert failed["reason"] == "ImagePullFailed" and "registry.invalid" in failed["message"], failed
    assert transition_reasons(kube, "pull") == ["AttemptStarted", "AttemptFailed", "AttemptStarted", "Failed"]
    assert [name for name, _, _ in pod_lifetimes(kube, "pull")] == ["pull-1", "pull-2"]
    assert "pull-1" not in kubelet.started, "no image, no process"
    assert kube.list("pods", kube.namespace, labels={"kontinue.dev/run": "pull"}) == [], \
        "the pod of a failed pull is deleted"


# -- the operator killed mid-run -----------------------------------------------------------------

def test_operator_killed_anywhere_the_run_ends_the_same(kube, kubelet, operator_process, manifest_in,
                                                        reference_state):
    """SIGKILL while the pod runs, while a preemption happens, and after the next attempt is
    recorded but before its pod exists: same counts, events, pods and bit-identical weights."""
    manifest, run_dir = manifest_in("e2e")
    trainer_status = local_trainer_status(run_dir)
    operator_process.start(*OPERATOR_ARGS)
    kube.create(manifest)

    # Across a preemption: the operator dies; the pod is disrupted and goes while none watches.
    # The preemptions stay clear of step 15, the end of epoch 1 of 2: resuming from the resume point
    # taken there ends training at once (a trainer bug, reported separately).
    kube.wait_for(lambda: "step" in trainer_status().get("lastCheckpoint", {})
                  and run_status(kube).get("phase") == "Running", 120, "the first resume point")
    operator_process.kill()
    kubelet.preempt("e2e-1")
    operator_process.start(*OPERATOR_ARGS)

    # While a pod runs: killed as soon as it saw e2e-2 run, back at once.
    kube.wait_for(lambda: run_status(kube).get("currentPod") == "e2e-2"
                  and run_status(kube).get("phase") == "Running", 120, "attempt 2 to run")
    operator_process.kill()
    operator_process.start(*OPERATOR_ARGS)
    wait_until_serving(operator_process)

    # After the next attempt is recorded, before its pod exists: the API server refuses pod
    # creation for a while (a ResourceQuota allowing no pods), and the operator dies then.
    kube.create({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-pods"},
                 "spec": {"hard": {"pods": "0"}}})
    preempt_after_checkpoint(kube, kubelet, trainer_status, 18)
    kube.wait_for(lambda: run_status(kube).get("currentPod") == "e2e-3", 60, "attempt 3 to be recorded")
    kube.wait_for(lambda: "exceeded quota" in (run_status(kube).get("message") or ""), 30,
                  "the operator to try creating e2e-3")
    operator_process.kill()
    assert kube.get("pods", kube.namespace, "e2e-3") is None
    kube.delete("resourcequotas", kube.namespace, "no-pods")
    operator_process.start(*OPERATOR_ARGS)

    status = wait_finished(kube, "e2e", 240)
    assert status["phase"] == "Succeeded", status
    assert (status["preemptions"], status.get("failures", 0), status["attempt"]) == (2, 0, 3), status
    succeeded = conditions_of(status)["Succeeded"]
    assert succeeded["status"] == "True", "kubectl wait --for=condition=Succeeded"
    assert status["progress"] == "100%"
    crd = kube.get("customresourcedefinitions", None, "trainingruns.kontinue.dev")
    columns = {c["name"]: c["jsonPath"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    for column, value in (("Phase", "Succeeded"), ("Progress", "100%"), ("Preemptions", 2), ("Attempt", 3)):
        assert status[columns[column].removeprefix(".status.")] == value, "what `kubectl get trainingruns` shows"
    assert trainer_status()["finalState"]["sha256"] == reference_state, json.dumps(trainer_status(), indent=1)
    assert transition_reasons(kube) == ["AttemptStarted", "Running", "Preempted"] * 2 + \
        ["AttemptStarted", "PodCreateFailed", "Running", "Succeeded"], kube.dump()
    assert_one_pod_at_a_time(kube, kubelet, "e2e", ["e2e-1", "e2e-2", "e2e-3"])
    assert any(s.get("phase") == "Running" and s.get("progress") not in (None, "100%")
               for s in run_history(kube, "e2e")), "status.progress is kept up to date while the pod runs"


def wait_until_serving(operator_process) -> None:
    """Until the operator's latest start has reconciled something (its kopf startup is done)."""
    latest = operator_process._logs[-1]
    operator_process.kube.wait_for(lambda: "Handler 'run_changed' succeeded" in latest.read_text(), 60,
                                   "the restarted operator to reconcile")


def test_a_pod_the_api_server_refuses_is_reported_and_created_once_it_may_be(
        kube, kubelet, operator_process, manifest_in):
    """A ResourceQuota allowing no GPU: the pod is refused (403, exceeded quota), the run says so
    once and keeps trying; once the quota allows a GPU the pod is created."""
    kube.create({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "gpus"},
                 "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}})
    kube.wait_for_object("resourcequotas", kube.namespace, "gpus", lambda q: (q.get("status") or {}).get("hard"))
    operator_process.start(*OPERATOR_ARGS)
    kubelet.override_command("quota", SLEEPER)
    manifest, _ = manifest_in("quota", resources={"gpus": 1})
    kube.create(manifest)
    kube.wait_for(lambda: "exceeded quota" in (run_status(kube, "quota").get("message") or ""), 30,
                  "the refusal in the run's status")
    time.sleep(3)  # retries (--backoff-seconds 1) post no more events
    status = run_status(kube, "quota")
    assert 'pods "quota-1" is forbidden: exceeded quota: gpus' in status["message"] and status["phase"] == "Pending"
    assert conditions_of(status)["Running"]["reason"] == "PodCreateFailed"
    assert transition_reasons(kube, "quota") == ["AttemptStarted", "PodCreateFailed"], "one Warning, not one per try"
    kube.patch("resourcequotas", kube.namespace, "gpus", {"spec": {"hard": {"requests.nvidia.com/gpu": "1"}}})
    kube.wait_for(lambda: run_status(kube, "quota").get("phase") == "Running", 60, "the pod once the quota allows")
    status = run_status(kube, "quota")
    assert (status["attempt"], status.get("failures", 0), status.get("preemptions", 0)) == (1, 0, 0), status


# -- invalid specs, deletion, probes and metrics ---------------------------------------------------

def test_invalid_specs_fail_with_the_field_and_the_operator_lives_on(kube, kubelet, operator_process, manifest_in):
    health, metrics = free_port(), free_port()
    operator_process.start("--health-port", str(health), "--metrics-port", str(metrics), *OPERATOR_ARGS[4:])
    enum, _ = manifest_in("enum")
    enum["spec"]["task"]["problemType"] = "clustering"
    shape, _ = manifest_in("shape")
    shape["spec"] = "train it"
    for manifest, field in ((enum, 'spec.task.problemType: Unsupported value: "clustering"'),
                            (shape, "spec: Invalid value: \"string\": spec in body must be of type object")):
        with pytest.raises(ApiError) as refused:  # the CRD's schema: the API server refuses them itself
            kube.create(manifest)
        assert refused.value.status == 422 and field in refused.value.body["message"], refused.value.body
    typo, _ = manifest_in("typo", hyperparameters={"optim.lrr": 1})  # what no schema can tell: the operator
    uncased, _ = manifest_in("uncased", hyperparameters={"optim.lr": "fast"})
    for manifest in (typo, uncased):
        kube.create(manifest)
    for name, field in (("typo", "spec.hyperparameters.optim.lrr: unknown hyperparameter; did you mean 'optim.lr'?"),
                        ("uncased", "spec.hyperparameters.optim.lr")):
        status = wait_finished(kube, name, 60)
        failed = conditions_of(status)["Failed"]
        assert (status["phase"], failed["status"], failed["reason"]) == ("Failed", "True", "InvalidSpec"), status
        assert field in failed["message"], failed
        assert conditions_of(status)["Running"]["status"] == "False"
    valid, _ = manifest_in("valid")
    kubelet.override_command("valid", SLEEPER)  # attempt 1 only waits to be preempted
    kube.create(valid)
    kube.wait_for(lambda: run_status(kube, "valid").get("phase") == "Running", 60, "attempt 1 to run")
    kubelet.override_command("valid", None)
    kubelet.preempt("valid-1")
    status = wait_finished(kube, "valid")
    assert (status["phase"], status["preemptions"], status["attempt"]) == ("Succeeded", 1, 2), status
    for name in ("typo", "uncased"):
        assert transition_reasons(kube, name) == ["InvalidSpec"]
        assert pod_lifetimes(kube, name) == []
    assert operator_process.running
    assert "Traceback" not in operator_process.logs(), operator_process.logs()[-3000:]

    assert requests.get(f"http://127.0.0.1:{health}/healthz", timeout=10).status_code == 200
    text = requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
    assert samples['kontinue_trainingruns{phase="Failed"}'] == 2
    assert samples['kontinue_trainingruns{phase="Succeeded"}'] == 1
    assert samples['kontinue_trainingruns{phase="Running"}'] == 0
    assert sum(v for k, v in samples.items() if k.startswith("kontinue_preemptions_total{")) == 1, text
    assert samples["kontinue_trainer_pods_created_total"] == 2
    assert samples["kontinue_resume_latency_seconds_count"] == 1


def test_deleting_a_run_removes_its_pods_and_its_directory_only_when_asked(
        kube, kubelet, operator_process, manifest_in):
    operator_process.start(*OPERATOR_ARGS)
    keep, keep_dir = manifest_in("keep")
    wipe, wipe_dir = manifest_in("wipe", deleteRunDirectory=True)
    kube.create(keep)
    kube.create(wipe)
    for name, run_dir in (("keep", keep_dir), ("wipe", wipe_dir)):
        kube.wait_for(lambda: (local_trainer_status(run_dir)().get("lastCheckpoint") or {}).get("step", -1) >= 1
                      and run_status(kube, name).get("phase") == "Running", 120, f"{name} to checkpoint")
    for name in ("keep", "wipe"):
        kube.delete("trainingruns", kube.namespace, name)
    for name in ("keep", "wipe"):
        kube.wait_for(lambda: kube.get("trainingruns", kube.namespace, name) is None, 60, f"{name} to go")
        kube.wait_for(lambda: kube.list("pods", kube.namespace, labels={"kontinue.dev/run": name}) == []
                      and not any(p.startswith(f"{name}-") for p in kubelet.running_pods()), 60,
                      f"the pods of {name} to go")
    assert (keep_dir / "status.json").exists(), "the run directory outlives its TrainingRun"
    time.sleep(1)  # anything a late writer would put there
    assert not wipe_dir.exists() or not any(path.is_file() for path in wipe_dir.rglob("*")), \
        sorted(str(p) for p in wipe_dir.rglob("*"))
    assert operator_process.running
