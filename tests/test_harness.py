"""The Kubernetes test harness itself (tests/kube_fixtures.py): API server semantics the operator
relies on, the kubelet, and a real kopf operator process (tests/harness_operator.py) end to end."""

from __future__ import annotations

import json
import signal
import sys
import textwrap

import kubernetes
import pytest
import requests

from tests.kube_fixtures import ApiError

NS = "tests"


def run(name: str, script: str | None = None, **annotations: str) -> dict:
    if script is not None:
        annotations["harness.kontinue.dev/script"] = textwrap.dedent(script)
    return {"apiVersion": "kontinue.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": name, "annotations": annotations}, "spec": {"seed": 1}}


def pod(name: str, script: str, *, run_label: str | None = "r", image: str = "python:3.11",
        env: list | None = None, grace: int = 30, policy: str = "File", **container) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"kontinue.dev/run": run_label} if run_label else {}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace,
                     "containers": [{"name": "main", "image": image, "env": env or [],
                                     "command": [sys.executable, "-c", textwrap.dedent(script)],
                                     "terminationMessagePolicy": policy, **container}]}}


def terminated(obj: dict | None) -> dict | None:
    statuses = ((obj or {}).get("status") or {}).get("containerStatuses") or [{}]
    return statuses[0].get("state", {}).get("terminated")


def conditions(obj: dict) -> dict:
    return {c["type"]: c for c in obj["status"].get("conditions", [])}


SLEEPER = """
    import os, signal, sys, time
    def stop(*_):
        open(os.environ["KONTINUE_TERMINATION_LOG"], "w").write("checkpoint saved")
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print("training", flush=True)
    time.sleep(120)
"""


# -- the API server ---------------------------------------------------------------------------

def test_objects_get_server_metadata_and_status_is_a_subresource(kube):
    created = kube.create(run("r1") | {"status": {"phase": "Forged"}})
    meta = created["metadata"]
    assert meta["namespace"] == NS and meta["generation"] == 1 and len(meta["uid"]) == 36
    assert meta["creationTimestamp"].endswith("Z") and "status" not in created
    with pytest.raises(ApiError) as conflict:
        kube.create(run("r1"))
    assert conflict.value.status == 409

    relabelled = kube.patch("trainingruns", NS, "r1", {"metadata": {"labels": {"a": "b"}}})
    assert relabelled["metadata"]["generation"] == 1
    assert int(relabelled["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    respecced = kube.patch("trainingruns", NS, "r1", {"spec": {"seed": 2}, "status": {"phase": "X"}})
    assert respecced["metadata"]["generation"] == 2 and "status" not in respecced
    noop = kube.patch("trainingruns", NS, "r1", {"spec": {"seed": 2}})
    assert noop["metadata"]["resourceVersion"] == respecced["metadata"]["resourceVersion"]
    status = kube.patch("trainingruns", NS, "r1", {"status": {"phase": "Running"}, "spec": {"seed": 3}},
                        subresource="status")
    assert status["status"] == {"phase": "Running"} and status["spec"] == {"seed": 2}
    assert status["metadata"]["generation"] == 2

    event = kube.create({"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "r1-"},
                         "involvedObject": {"kind": "TrainingRun", "name": "r1"}, "reason": "Test"})
    assert event["metadata"]["name"].startswith("r1-")
    assert [e["reason"] for e in kube.events(NS, involved_name="r1")] == ["Test"]
    secret = kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
                          "stringData": {"key": "value"}})
    assert secret["data"] == {"key": "dmFsdWU="} and "stringData" not in secret


def test_concurrency_control_and_patch_types(kube):
    stale = kube.create(run("r1"))["metadata"]["resourceVersion"]
    kube.patch("trainingruns", NS, "r1", {"spec": {"seed": 5}})
    with pytest.raises(ApiError) as conflict:
        kube.patch("trainingruns", NS, "r1", {"metadata": {"resourceVersion": stale}, "spec": {"seed": 6}})
    assert conflict.value.status == 409
    with pytest.raises(ApiError) as failed_test:  # kopf's finalizer patches: test op -> 422
        kube.patch("trainingruns", NS, "r1", [{"op": "test", "path": "/metadata/resourceVersion", "value": stale},
                                              {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}], type="json")
    assert failed_test.value.status == 422
    replaced = kube.get("trainingruns", NS, "r1") | {"spec": {"seed": 7}}
    assert kube.request("PUT", "/apis/kontinue.dev/v1alpha1/namespaces/tests/trainingruns/r1",
                        body=replaced)["metadata"]["generation"] == 3
    with pytest.raises(ApiError) as stale_put:
        kube.request("PUT", "/apis/kontinue.dev/v1alpha1/namespaces/tests/trainingruns/r1", body=replaced)
    assert stale_put.value.status == 409
    with pytest.raises(ApiError) as unsupported:  # as a real server: no strategic merge for CRs
        kube.patch("trainingruns", NS, "r1", {"spec": {"seed": 6}}, type="strategic")
    assert unsupported.value.status == 415
    kube.create(pod("p", "pass", env=[{"name": "A", "value": "1"}]))
    patched = kube.patch("pods", NS, "p", {"spec": {"containers": [{"name": "main", "env": [
        {"name": "B", "value": "2"}]}]}}, type="strategic")
    assert [e["name"] for e in patched["spec"]["containers"][0]["env"]] == ["A", "B"]


def test_label_and_field_selectors(kube):
    kube.create(run("a") | {"metadata": {"name": "a", "labels": {"tier": "gold", "x": "1"}}})
    kube.create(run("b") | {"metadata": {"name": "b", "labels": {"tier": "silver"}}})
    kube.create(run("c"))

    def names(**kwargs):
        return [obj["metadata"]["name"] for obj in kube.list("trainingruns", NS, **kwargs)]
    assert names() == ["a", "b", "c"]
    assert names(labels={"tier": "gold"}) == ["a"]
    assert names(labels={"tier": None}) == ["a", "b"]
    assert names(labels="tier!=gold") == ["b", "c"]
    assert names(labels="!tier") == ["c"]
    assert names(labels="tier in (gold, silver),x") == ["a"]
    assert names(labels="tier notin (gold)") == ["b", "c"]
    assert names(fields="metadata.name=b") == ["b"]
    assert kube.list("trainingruns", "default") == []


def test_finalizers_block_deletion_and_owners_collect_their_pods(kube):
    owner = kube.create(run("r1") | {"metadata": {"name": "r1", "finalizers": ["test/block"]}})
    reference = {"apiVersion": owner["apiVersion"], "kind": "TrainingRun", "name": "r1",
                 "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    kube.create(pod("r1-1", "pass") | {"metadata": {"name": "r1-1", "ownerReferences": [reference]}})
    kube.create(pod("other", "pass"))

    kube.delete("trainingruns", NS, "r1")
    marked = kube.get("trainingruns", NS, "r1")
    assert marked["metadata"]["deletionTimestamp"] and kube.get("pods", NS, "r1-1")
    with pytest.raises(ApiError):  # no new finalizers on an object being deleted
        kube.patch("trainingruns", NS, "r1", {"metadata": {"finalizers": ["test/block", "more"]}})
    kube.patch("trainingruns", NS, "r1", {"metadata": {"finalizers": []}})
    assert kube.get("trainingruns", NS, "r1") is None
    kube.wait_for(lambda: kube.get("pods", NS, "r1-1") is None, 5, "the garbage collector")
    assert kube.get("pods", NS, "other")


def test_a_scheduled_pod_is_deleted_gracefully(kube):
    kube.create(pod("p", "pass", grace=30) | {"spec": pod("p", "pass")["spec"] | {"nodeName": "n"}})
    kube.delete("pods", NS, "p")
    marked = kube.get("pods", NS, "p")
    assert marked["metadata"]["deletionGracePeriodSeconds"] == 30 and marked["metadata"]["deletionTimestamp"]
    kube.patch("pods", NS, "p", {"status": {"phase": "Failed"}}, subresource="status")
    assert kube.get("pods", NS, "p")  # a write in the grace period does not remove it
    kube.delete("pods", NS, "p", grace=0)  # what the kubelet does once the containers stopped
    assert kube.get("pods", NS, "p") is None


def test_typed_client_and_watch_resuming_from_a_resource_version(kube):
    core = kubernetes.client.CoreV1Api(kube.api_client())
    since = core.list_namespaced_pod(NS).metadata.resource_version
    created = core.create_namespaced_pod(NS, pod("a", "pass"))
    assert isinstance(created, kubernetes.client.V1Pod) and created.metadata.uid
    core.create_namespaced_pod(NS, pod("b", "pass", run_label=None))
    core.patch_namespaced_pod("a", NS, {"metadata": {"annotations": {"k": "v"}}})
    core.delete_namespaced_pod("a", NS)
    assert [p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="kontinue.dev/run").items] == []

    response = requests.get(f"{kube.url}/api/v1/namespaces/{NS}/pods", stream=True, timeout=10, params={
        "watch": "true", "resourceVersion": since, "labelSelector": "kontinue.dev/run", "timeoutSeconds": "1"})
    events = [json.loads(line) for line in response.iter_lines() if line]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]


# -- the kubelet ------------------------------------------------------------------------------

def test_kubelet_runs_a_pod_with_its_env_volumes_and_termination_message(kube, kubelet):
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
                 "stringData": {"token": "s3cret"}})
    script = """
        import os, sys
        open(sys.argv[1] + "/out.txt", "w").write("written")
        open(os.environ["KONTINUE_TERMINATION_LOG"], "w").write("finished " + os.environ["GREETING"])
        print("token", os.environ["TOKEN"], "pod", os.environ["POD"], "dir", sys.argv[1])
    """
    manifest = pod("p1", script, args=["/scratch"], volumeMounts=[{"name": "s", "mountPath": "/scratch"}], env=[
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "GREETING", "value": "in $(POD)"}])
    manifest["spec"]["volumes"] = [{"name": "s", "emptyDir": {}}]
    kube.create(manifest)

    done = kube.wait_for_object("pods", NS, "p1", lambda p: p["status"]["phase"] == "Succeeded", 20)
    state = terminated(done)
    assert state["exitCode"] == 0 and state["reason"] == "Completed" and state["message"] == "finished in p1"
    assert state["startedAt"] <= state["finishedAt"] and done["spec"]["nodeName"] == kubelet.node_name
    assert conditions(done)["PodScheduled"]["status"] == "True" and conditions(done)["Ready"]["status"] == "False"
    phases = [v["status"]["phase"] for v in kube.history("pods", NS, "p1") if v]
    assert phases[-3:] == ["Pending", "Running", "Succeeded"]
    running = [v for v in kube.history("pods", NS, "p1") if v and v["status"]["phase"] == "Running"][0]
    status = running["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0 and status["state"]["running"]["startedAt"]
    log = kubelet.logs("p1")
    assert "token s3cret pod p1 dir /" in log and " /scratch" not in log
    scratch = log.split("dir ")[1].strip()
    assert open(f"{scratch}/out.txt").read() == "written"
    served = kubernetes.client.CoreV1Api(kube.api_client()).read_namespaced_pod_log("p1", NS, _preload_content=False)
    assert served.headers["Content-Type"] == "text/plain" and served.data.decode() == log
    assert kubelet.started == ["p1"] and kubelet.running_pods() == []


def test_kubelet_failures_oom_image_pull_and_missing_config(kube, kubelet):
    kube.create(pod("crash", "import sys; print('boom'); sys.exit(3)", policy="FallbackToLogsOnError"))
    kube.create(pod("oom", SLEEPER))
    kube.create(pod("killed", SLEEPER))
    kube.create(pod("pull", "pass", image="registry.invalid/trainer:1"))
    kube.create(pod("config", "pass", env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "late", "key": "x"}}}]))
    kube.create(pod("bystander", "pass", run_label=None))
    kubelet.override_command("bad-code", [sys.executable, "-c", "import sys; sys.exit(5)"])
    kube.create(pod("overridden", "pass", run_label="bad-code"))

    crashed = kube.wait_for_object("pods", NS, "crash", lambda p: p["status"]["phase"] == "Failed", 20)
    assert terminated(crashed) | {"startedAt": 0, "finishedAt": 0, "containerID": 0} == {
        "exitCode": 3, "reason": "Error", "message": "boom", "startedAt": 0, "finishedAt": 0, "containerID": 0}
    overridden = kube.wait_for_object("pods", NS, "overridden", lambda p: p["status"]["phase"] == "Failed", 20)
    assert terminated(overridden)["exitCode"] == 5
    kubelet.wait_until_running("oom")
    kubelet.oom("oom")
    oomed = kube.wait_for_object("pods", NS, "oom", lambda p: p["status"]["phase"] == "Failed", 10)
    assert (terminated(oomed)["exitCode"], terminated(oomed)["reason"]) == (137, "OOMKilled")
    kubelet.wait_until_running("killed")
    kubelet.kill("killed", exit_code=2)
    killed = kube.wait_for_object("pods", NS, "killed", lambda p: p["status"]["phase"] == "Failed", 10)
    assert (terminated(killed)["exitCode"], terminated(killed)["reason"]) == (2, "Error")

    def waiting(p):
        return p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
    pulling = kube.wait_for_object("pods", NS, "pull", lambda p: waiting(p) == "ImagePullBackOff", 10)
    assert pulling["status"]["phase"] == "Pending"
    config = kube.wait_for_object("pods", NS, "config", lambda p: waiting(p) == "CreateContainerConfigError")
    assert "late" in config["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"}, "stringData": {"x": "1"}})
    kube.wait_for_object("pods", NS, "config", lambda p: p["status"]["phase"] == "Succeeded", 20)
    assert "nodeName" not in kube.get("pods", NS, "bystander")["spec"]  # not ours: never scheduled


def test_kubelet_preemption_deletion_and_node_loss(kube, kubelet):
    kube.create(pod("preempted", SLEEPER))
    kube.create(pod("stubborn", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                "print('up', flush=True); time.sleep(120)", grace=1))
    kube.create(pod("lost", SLEEPER))
    for name in ("preempted", "stubborn", "lost"):
        kubelet.wait_until_running(name)
    kube.wait_for(lambda: "training" in kubelet.logs("preempted") and "up" in kubelet.logs("stubborn"), 10)

    kubelet.preempt("preempted", grace=5)
    history = [v for v in kube.history("pods", NS, "preempted") if v]
    final = history[-1]
    assert final["metadata"]["deletionTimestamp"] and final["metadata"]["deletionGracePeriodSeconds"] == 5
    assert conditions(final)["DisruptionTarget"]["reason"] == "PreemptionByScheduler"
    assert final["status"]["phase"] == "Failed"
    assert (terminated(final)["exitCode"], terminated(final)["message"]) == (143, "checkpoint saved")
    assert kube.history("pods", NS, "preempted")[-1] is None  # removed

    kube.delete("pods", NS, "stubborn")  # by someone else; ignores SIGTERM: SIGKILL after 1 s
    kube.wait_for(lambda: kube.get("pods", NS, "stubborn") is None, 10, "stubborn pod to go")
    assert terminated([v for v in kube.history("pods", NS, "stubborn") if v][-1])["exitCode"] == 137

    kubelet.vanish("lost")
    assert kube.get("pods", NS, "lost") is None
    assert not any(terminated(v) for v in kube.history("pods", NS, "lost") if v)
    assert kubelet.running_pods() == []


# -- a real kopf operator, as a separate process ----------------------------------------------

def test_kopf_operator_end_to_end(kube, kubelet, operator_process):
    operator_process.start(command=[sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", NS,
                                    "tests/harness_operator.py"])
    done_script = """
        import os, sys
        open(sys.argv[1], "w").write("x")
        open(os.environ["KONTINUE_TERMINATION_LOG"], "w").write("done in " + os.environ["POD_NAME"])
        print("hi")
    """
    owner = kube.create(run("r1", done_script))
    pod1 = kube.wait_for_object("pods", NS, "r1-1", lambda p: p is not None, 30)
    assert pod1["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    finished = kube.wait_for_object("trainingruns", NS, "r1", lambda r: r.get("status", {}).get("podPhase") == "Succeeded")
    assert finished["status"] | {"podEvent": None} == {
        "phase": "Started", "pod": "r1-1", "podPhase": "Succeeded", "podEvent": None,
        "exitCode": 0, "reason": "Completed", "message": "done in r1-1"}
    assert "hi" in kubelet.logs("r1-1")
    assert "PodCreated" in [e["reason"] for e in kube.events(NS, involved_name="r1")]

    kube.create(run("r2", SLEEPER))
    kubelet.wait_until_running("r2-1")
    kubelet.preempt("r2-1", grace=5)
    preempted = kube.wait_for_object("trainingruns", NS, "r2", lambda r: r["status"].get("disruption"))
    assert preempted["status"]["disruption"] == "PreemptionByScheduler" and preempted["status"]["exitCode"] == 143

    kube.create(run("r3", SLEEPER))
    kubelet.wait_until_running("r3-1")
    kube.delete("trainingruns", NS, "r3")  # kopf's finalizer first, then the collector takes the pod
    kube.wait_for(lambda: kube.get("trainingruns", NS, "r3") is None, 20, "kopf to release r3")
    kube.wait_for(lambda: kube.get("pods", NS, "r3-1") is None, 20, "r3-1 to be collected")
    assert "r3-1" not in kubelet.running_pods()

    operator_process.kill()
    operator_process.restart()  # after SIGKILL, from the state on the objects
    kube.create(run("r4"))
    kube.wait_for_object("pods", NS, "r4-1", lambda p: p and p["status"]["phase"] == "Succeeded", 30)
    assert operator_process.stop() is not None and "run r3 is being deleted" in operator_process.logs()
    assert kubelet.started == ["r1-1", "r2-1", "r3-1", "r4-1"]
