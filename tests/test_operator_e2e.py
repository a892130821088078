"""The operator end to end: kopf (its own process, with the RBAC it ships) against a real API
server, a harness kubelet running the real trainer, checkpoints in a real S3-protocol server."""

from __future__ import annotations

import json
import random
import sys
import time

import pytest

from tests.operator_helpers import (OPERATOR_ARGS, assert_one_pod_at_a_time, run_status, tables_on_claim,
                                    transition_reasons)
from tests.tools import run_kubectl
from tests.trainer_fixtures import training_run


@pytest.fixture
def s3_run(kube, kubelet, s3_server, tiny_bert, review_tables):
    """A TrainingRun checkpointing to S3, with its credentials in a Secret and its data on a claim."""
    bucket = s3_server.make_bucket("e2e")
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"},
                 "stringData": {"endpoint": s3_server.endpoint, "accessKey": s3_server.access_key,
                                "secretKey": s3_server.secret_key}})
    data, data_volume = tables_on_claim(kubelet, review_tables)
    manifest = training_run("e2e", f"s3://{bucket}/store", data, tiny_bert, volumes=[data_volume])
    manifest["spec"]["checkpoint"]["secretRef"] = {"name": "s3-credentials"}
    manifest["metadata"]["namespace"] = kube.namespace

    def trainer_status() -> dict:
        try:
            return json.loads(s3_server.client().get_object(bucket, f"store/{kube.namespace}/e2e/status.json").read())
        except Exception:  # not written yet
            return {}
    return manifest, trainer_status


def test_preempted_by_the_scheduler_an_eviction_and_a_lost_node_the_run_finishes_bit_identical(
        kube, kubelet, operator_process, s3_run, reference_state, priority_classes, tmp_path):
    """Three preemptions as Kubernetes makes them, each a real pod object the verdicts read: the
    scheduler gives the GPU to a higher-priority pod, `kubectl drain`'s Eviction API, and a node
    that dies (the node lifecycle controller taints it, the taint manager deletes the pod, which
    stays Terminating until the operator deletes it for good)."""
    manifest, trainer_status = s3_run
    manifest["spec"]["resources"] = {"gpus": 1, "priorityClassName": priority_classes["low"]}
    ns = kube.namespace
    kube.patch("nodes", None, kubelet.node_name, {"spec": {"unschedulable": True}})  # no GPU work there
    kubelet.add_node(gpus=1)  # the one GPU there is, until step 2 adds another node
    operator_process.start(*OPERATOR_ARGS, "--node-lost-seconds", "2")
    kube.create(manifest)

    def current_pod(attempt: int) -> dict:
        """The pod of `attempt` once it trains, frozen a moment later until the preemption reaches
        it: the step it is stopped at is its own, with steps left for the next attempts (its durable
        resume points lag its steps, saved in the background, and would say too late)."""
        kube.wait_for(lambda: len(trainer_status().get("attempts") or []) >= attempt
                      and run_status(kube).get("phase") == "Running", 180, f"attempt {attempt} to train")
        time.sleep(random.uniform(0, 0.5))
        pod = kube.get("pods", ns, run_status(kube)["currentPod"])
        kubelet.hold(pod["metadata"]["name"], ns)
        return pod

    # 1. The scheduler: the trainer holds the only schedulable GPU; an urgent pod takes it.
    victim = current_pod(1)
    kube.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "urgent"}, "spec": {
        "priorityClassName": priority_classes["high"], "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "inference", "image": "kontinue:test", "command": [sys.executable, "-c", "pass"],
                        "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}})
    kubelet.wait_gone(victim["metadata"]["name"], uid=victim["metadata"]["uid"], timeout=90)
    kube.wait_for_object("pods", ns, "urgent", lambda p: p["status"].get("phase") == "Succeeded", 60)
    kubelet.add_node(gpus=1)  # (a cordon right before the urgent pod can reach the scheduler too late)

    # 2. The Eviction API, as `kubectl drain` uses it.
    evicted = current_pod(2)
    kube.evict(evicted["metadata"]["name"])
    kubelet.wait_gone(evicted["metadata"]["name"], uid=evicted["metadata"]["uid"], timeout=90)

    # 3. The node dies with the trainer on it.
    stranded = current_pod(3)
    kubelet.lose_node(stranded["spec"]["nodeName"])
    kube.wait_for(lambda: run_status(kube).get("phase") in ("Succeeded", "Failed"), 300, "the run to finish")

    status = run_status(kube)
    assert status["phase"] == "Succeeded", status
    assert (status["preemptions"], status.get("failures", 0), status["attempt"]) == (3, 0, 4), status
    trainer = trainer_status()
    assert trainer["finalState"]["sha256"] == reference_state, \
        f"the resumed run must end bit-identical: {json.dumps(trainer, indent=1)}\n{kubelet.dump()}"
    assert transition_reasons(kube) == ["AttemptStarted", "Running", "Preempted"] * 2 + [
        "AttemptStarted", "Running", "NodeLost", "Preempted", "AttemptStarted", "Running", "Succeeded"]
    preempted = [event["message"] for event in kube.events(ns, "e2e") if event["reason"] == "Preempted"]
    for message, cause in zip(preempted, ("PreemptionByScheduler", "EvictionByEvictionAPI", "DeletionByTaintManager")):
        assert cause in message, preempted
    resumed = [event["message"] for event in kube.events(ns, "e2e") if event["reason"] == "AttemptStarted"]
    assert all("resuming from s3://" in message for message in resumed[1:]), resumed
    assert_one_pod_at_a_time(kube, kubelet, "e2e", ["e2e-1", "e2e-2", "e2e-3", "e2e-4"])
    assert status["metrics"] and status["dumpedModelUri"].endswith("/dump")
    assert [p["metadata"]["name"] for p in kube.list("pods", ns, labels={"kontinue.dev/run": "e2e"})] == ["e2e-4"]
    # what a user sees: kubectl against the same API server, as the operator's reader
    kubeconfig = kube.kubeconfig(tmp_path / "user.kubeconfig")
    run_kubectl("wait", "--for=condition=Succeeded", "trainingrun/e2e", "-n", ns, "--timeout=10s", kubeconfig=kubeconfig)
    row = run_kubectl("get", "trainingrun", "e2e", "-n", ns, "--no-headers", kubeconfig=kubeconfig).stdout.split()
    assert row[:4] == ["e2e", "Succeeded", "100%", "3"], row


def test_a_trainer_left_on_a_partitioned_node_cannot_overwrite_the_next_attempt(
        kube, kubelet, operator_process, s3_run, reference_state):
    """Fencing: the node of attempt 1 drops off the network with its trainer alive. The operator
    moves the run to another node (NodeLost); when the old trainer runs on, its next write finds
    the run directory claimed by attempt 2 and it stops without writing. The run ends as if
    nothing happened."""
    manifest, trainer_status = s3_run
    kubelet.add_node()  # a zone whose every node is down gets no evictions
    operator_process.start(*OPERATOR_ARGS, "--node-lost-seconds", "2", "--grace-seconds", "5")
    kube.create(manifest)
    kube.wait_for(lambda: (trainer_status().get("lastCheckpoint") or {}).get("step", -1) >= 1
                  and run_status(kube).get("phase") == "Running", 180, "attempt 1's first resume point")
    first = kube.get("pods", kube.namespace, "e2e-1")
    kubelet.partition_node(first["spec"]["nodeName"])

    kube.wait_for(lambda: run_status(kube).get("currentPod") == "e2e-2" and run_status(kube).get("phase") == "Running",
                  120, "attempt 2 to run on the other node")
    kube.wait_for(lambda: len(trainer_status().get("attempts") or []) >= 2, 120, "attempt 2 to claim the directory")
    kubelet.thaw(first["spec"]["nodeName"])  # the old trainer goes on, its node still unreachable
    kube.wait_for(lambda: kubelet.exit_code("e2e-1") is not None, 120, "the old trainer to stop")
    assert kubelet.exit_code("e2e-1") == 75 and "superseded" in kubelet.logs("e2e-1"), kubelet.logs("e2e-1")[-2000:]

    kube.wait_for(lambda: run_status(kube).get("phase") in ("Succeeded", "Failed"), 300, "the run to finish")
    status = run_status(kube)
    assert (status["phase"], status["preemptions"], status.get("failures", 0)) == ("Succeeded", 1, 0), status
    assert trainer_status()["finalState"]["sha256"] == reference_state
    assert "NodeLost" in transition_reasons(kube)
