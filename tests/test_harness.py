"""The Kubernetes test harness itself (tests/kube_fixtures.py, tests/control_plane.py): the kubelet
it plays on a real control plane, and what the control plane's scheduler, Eviction API, node
lifecycle and taint eviction do to the pods it runs (what the operator's verdicts later read)."""

from __future__ import annotations

import sys
import textwrap

import kubernetes
import pytest

from tests.kube_fixtures import ApiError

RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def pod(name: str, script: str, *, run_label: str | None = "r", image: str = "python:3.11",
        env: list | None = None, grace: int = 30, policy: str = "File", gpus: int = 0,
        priority: str | None = None, **container) -> dict:
    """A pod PodSecurity "restricted" admits, running `script` with this Python."""
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "main", "image": image, "env": env or [], "resources": resources,
                            "command": [sys.executable, "-c", textwrap.dedent(script)],
                            "terminationMessagePolicy": policy, "securityContext": RESTRICTED, **container}]}
    if priority:
        spec["priorityClassName"] = priority
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"kontinue.dev/run": run_label} if run_label else {}},
            "spec": spec}


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




# -- the kubelet ------------------------------------------------------------------------------

def test_kubelet_runs_a_pod_with_its_env_volumes_and_termination_message(kube, kubelet):
    ns = kube.namespace
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

    done = kube.wait_for_object("pods", ns, "p1", lambda p: p["status"]["phase"] == "Succeeded", 30)
    state = terminated(done)
    assert state["exitCode"] == 0 and state["reason"] == "Completed" and state["message"] == "finished in p1"
    assert state["startedAt"] <= state["finishedAt"] and done["spec"]["nodeName"] == kubelet.node_name
    assert conditions(done)["PodScheduled"]["status"] == "True" and conditions(done)["Ready"]["status"] == "False"
    phases = [v["status"]["phase"] for v in kube.history("pods", ns, "p1") if v]
    assert phases[-3:] == ["Pending", "Running", "Succeeded"]
    running = [v for v in kube.history("pods", ns, "p1") if v and v["status"]["phase"] == "Running"][0]
    status = running["status"]["containerStatuses"][0]
    assert status["ready"] and status["restartCount"] == 0 and status["state"]["running"]["startedAt"]
    log = kubelet.logs("p1")
    assert "token s3cret pod p1 dir /" in log and " /scratch" not in log
    scratch = log.split("dir ")[1].strip()
    assert open(f"{scratch}/out.txt").read() == "written"
    # the API server proxies pods/log to the kubelet's endpoint (what the operator and kubectl logs read)
    core = kubernetes.client.CoreV1Api(kube.api_client())
    assert core.read_namespaced_pod_log("p1", ns, _preload_content=False).data.decode() == log
    assert core.read_namespaced_pod_log("p1", ns, tail_lines=1, _preload_content=False).data.decode() == log
    assert kubelet.started == ["p1"] and kubelet.running_pods() == []


def test_kubelet_failures_oom_image_pull_and_missing_config(kube, kubelet):
    ns = kube.namespace
    kube.create(pod("crash", "import sys; print('boom'); sys.exit(3)", policy="FallbackToLogsOnError"))
    kube.create(pod("oom", SLEEPER))
    kube.create(pod("killed", SLEEPER))
    kube.create(pod("pull", "pass", image="registry.invalid/trainer:1"))
    kube.create(pod("config", "pass", env=[{"name": "X", "valueFrom": {"secretKeyRef": {"name": "late", "key": "x"}}}]))
    kube.create(pod("nowhere", "pass") | {"spec": pod("nowhere", "pass")["spec"] | {"nodeSelector": {"gpu": "h100"}}})
    kubelet.override_command("bad-code", [sys.executable, "-c", "import sys; sys.exit(5)"])
    kube.create(pod("overridden", "pass", run_label="bad-code"))

    crashed = kube.wait_for_object("pods", ns, "crash", lambda p: p["status"]["phase"] == "Failed", 30)
    assert terminated(crashed) | {"startedAt": 0, "finishedAt": 0, "containerID": 0} == {
        "exitCode": 3, "reason": "Error", "message": "boom", "startedAt": 0, "finishedAt": 0, "containerID": 0}
    overridden = kube.wait_for_object("pods", ns, "overridden", lambda p: p["status"]["phase"] == "Failed", 20)
    assert terminated(overridden)["exitCode"] == 5
    kubelet.wait_until_running("oom")
    kubelet.oom("oom")
    oomed = kube.wait_for_object("pods", ns, "oom", lambda p: p["status"]["phase"] == "Failed", 10)
    assert (terminated(oomed)["exitCode"], terminated(oomed)["reason"]) == (137, "OOMKilled")
    kubelet.wait_until_running("killed")
    kubelet.kill("killed", exit_code=2)
    killed = kube.wait_for_object("pods", ns, "killed", lambda p: p["status"]["phase"] == "Failed", 10)
    assert (terminated(killed)["exitCode"], terminated(killed)["reason"]) == (2, "Error")

    def waiting(p):
        return p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
    pulling = kube.wait_for_object("pods", ns, "pull", lambda p: waiting(p) == "ImagePullBackOff", 10)
    assert pulling["status"]["phase"] == "Pending"
    config = kube.wait_for_object("pods", ns, "config", lambda p: waiting(p) == "CreateContainerConfigError")
    assert "late" in config["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
    kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"}, "stringData": {"x": "1"}})
    kube.wait_for_object("pods", ns, "config", lambda p: p["status"]["phase"] == "Succeeded", 20)
    unschedulable = kube.get("pods", ns, "nowhere")  # the real scheduler found no node for it
    assert "nodeName" not in unschedulable["spec"] and conditions(unschedulable)["PodScheduled"]["reason"] == "Unschedulable"


def test_graceful_deletion_and_force_deletion(kube, kubelet):
    ns = kube.namespace
    kube.create(pod("deleted", SLEEPER))
    kube.create(pod("stubborn", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                "print('up', flush=True); time.sleep(120)", grace=1))
    kube.create(pod("lost", SLEEPER))
    for name in ("deleted", "stubborn", "lost"):
        kubelet.wait_until_running(name)
    kube.wait_for(lambda: "training" in kubelet.logs("deleted") and "up" in kubelet.logs("stubborn"), 10)

    kube.delete("pods", ns, "deleted", grace=5)
    marked = kube.get("pods", ns, "deleted")
    assert marked["metadata"]["deletionGracePeriodSeconds"] == 5 and marked["metadata"]["deletionTimestamp"]
    kubelet.wait_gone("deleted")
    final = [v for v in kube.history("pods", ns, "deleted") if v][-1]
    assert final["status"]["phase"] == "Failed"
    assert (terminated(final)["exitCode"], terminated(final)["message"]) == (143, "checkpoint saved")
    assert kube.history("pods", ns, "deleted")[-1] is None  # removed by the kubelet once stopped

    kube.delete("pods", ns, "stubborn")  # ignores SIGTERM: SIGKILL after its 1 s grace period
    kube.wait_for(lambda: kube.get("pods", ns, "stubborn") is None, 10, "stubborn pod to go")
    assert terminated([v for v in kube.history("pods", ns, "stubborn") if v][-1])["exitCode"] == 137

    kubelet.vanish("lost")  # force-deleted: no final state
    assert kube.get("pods", ns, "lost") is None
    assert not any(terminated(v) for v in kube.history("pods", ns, "lost") if v)
    assert kubelet.running_pods() == []


# -- what the control plane does to pods ------------------------------------------------------

def test_the_scheduler_preempts_a_lower_priority_pod_for_the_gpu(kube, kubelet, priority_classes):
    ns = kube.namespace
    kubelet.add_node(f"{ns}-gpu", gpus=1)
    kube.patch("nodes", None, kubelet.node_name, {"spec": {"unschedulable": True}})  # cordoned: one GPU in all
    kube.create(pod("victim", SLEEPER, gpus=1, priority=priority_classes["low"]))
    assert kubelet.wait_until_running("victim")["spec"]["nodeName"] == f"{ns}-gpu"
    kube.create(pod("urgent", SLEEPER, gpus=1, priority=priority_classes["high"]))

    kube.wait_for(lambda: kube.get("pods", ns, "victim") is None, 60, "the victim to be preempted and go")
    final = [v for v in kube.history("pods", ns, "victim") if v][-1]
    disruption = conditions(final)["DisruptionTarget"]
    assert (disruption["status"], disruption["reason"]) == ("True", "PreemptionByScheduler")
    assert terminated(final)["exitCode"] == 143 and final["metadata"]["deletionTimestamp"]
    assert kubelet.wait_until_running("urgent", 60)["spec"]["nodeName"] == f"{ns}-gpu"


def test_the_eviction_api_honours_a_pod_disruption_budget(kube, kubelet):
    ns = kube.namespace
    kube.create(pod("guarded", SLEEPER, run_label="guarded"))
    kube.create(pod("evicted", SLEEPER, run_label="evicted"))
    for name in ("guarded", "evicted"):
        kubelet.wait_until_running(name)
    # bare pods have no scale for maxUnavailable to refer to: minAvailable is what budgets them
    for name, available, allowed in (("guarded", 1, 0), ("evicted", 0, 1)):
        kube.create({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": name},
                     "spec": {"minAvailable": available, "selector": {"matchLabels": {"kontinue.dev/run": name}}}})
        kube.wait_for_object("poddisruptionbudgets", ns, name, lambda b, allowed=allowed: (b.get("status") or {}).get(
            "currentHealthy") == 1 and b["status"]["disruptionsAllowed"] == allowed, 30)

    with pytest.raises(ApiError) as refused:
        kube.evict("guarded")
    assert refused.value.status == 429  # the budget allows no disruption: the pod stays
    kube.evict("evicted")
    kubelet.wait_gone("evicted")
    final = [v for v in kube.history("pods", ns, "evicted") if v][-1]
    assert conditions(final)["DisruptionTarget"]["reason"] == "EvictionByEvictionAPI"
    assert terminated(final)["exitCode"] == 143
    assert kubelet.running_pods() == ["guarded"]


def test_a_lost_node_is_tainted_and_its_pods_deleted_by_the_taint_manager(kube, kubelet):
    ns = kube.namespace
    unreachable = [{"key": f"node.kubernetes.io/{taint}", "operator": "Exists", "effect": "NoExecute",
                    "tolerationSeconds": 1} for taint in ("unreachable", "not-ready")]
    manifest = pod("stranded", SLEEPER)
    manifest["spec"]["tolerations"] = unreachable
    kube.create(manifest)
    node = kubelet.wait_until_running("stranded")["spec"]["nodeName"]
    kubelet.add_node()  # with every node of a zone down the controller assumes a network split and evicts nothing

    kubelet.lose_node(node)
    kube.wait_for_object("nodes", None, node, lambda n: any(
        t["key"] == "node.kubernetes.io/unreachable" and t["effect"] == "NoExecute"
        for t in n["spec"].get("taints") or []), 60, "the node lifecycle controller to taint the lost node")
    gone = kube.wait_for_object("pods", ns, "stranded", lambda p: p["metadata"].get("deletionTimestamp"), 30)
    assert conditions(gone)["DisruptionTarget"]["reason"] == "DeletionByTaintManager"
    assert terminated(gone) is None  # nobody reported an end: the pod stays Terminating
    kube.delete("pods", ns, "stranded", grace=0)  # until someone force-deletes it
    assert kube.get("pods", ns, "stranded") is None
