"""A throwaway kopf operator that test_harness.py runs against the emulator: NOT kontinue's operator.

Per TrainingRun it creates one pod `<name>-1` (owned by the run, labelled kontinue.dev/run) that
runs the Python code in the run's annotation `harness.kontinue.dev/script`, and mirrors the pod
back into the run's status. Run with: python -m kopf run --standalone --namespace NS this_file.
"""

import sys

import kopf
import kubernetes

RUN_LABEL = "kontinue.dev/run"
SCRIPT = "harness.kontinue.dev/script"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_):
    settings.watching.label_selectors["v1", "pods"] = RUN_LABEL  # server-side filtering
    settings.watching.server_timeout = 10  # watches reconnect (resuming from a resourceVersion)
    kubernetes.config.load_kube_config()


@kopf.on.create("kontinue.dev", "v1alpha1", "trainingruns")
def create_pod(body, name, namespace, annotations, patch, **_):
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{name}-1", "labels": {RUN_LABEL: name}},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "trainer",
                "image": annotations.get("harness.kontinue.dev/image", "python:3.11"),
                "command": [sys.executable, "-c", annotations.get(SCRIPT, "print('hi')")],
                "args": ["/scratch/out"],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "SCRATCH", "value": "/scratch"}],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            }],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
        },
    }
    kopf.adopt(pod, owner=body)
    created = kubernetes.client.CoreV1Api().create_namespaced_pod(namespace, pod)
    kopf.info(body, reason="PodCreated", message=f"created pod {created.metadata.name}")
    patch.status["phase"] = "Started"
    patch.status["pod"] = created.metadata.name


@kopf.on.event("v1", "pods", labels={RUN_LABEL: kopf.PRESENT})
def mirror_pod(type, body, namespace, labels, **_):
    status = body.get("status") or {}
    report = {"podPhase": status.get("phase"), "podEvent": type}
    for container in status.get("containerStatuses") or []:
        terminated = container.get("state", {}).get("terminated")
        if terminated:
            report.update(exitCode=terminated["exitCode"], reason=terminated["reason"],
                          message=terminated.get("message"))
    for condition in status.get("conditions") or []:
        if condition["type"] == "DisruptionTarget" and condition["status"] == "True":
            report["disruption"] = condition["reason"]
    try:
        kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object_status(
            "kontinue.dev", "v1alpha1", namespace, "trainingruns", labels[RUN_LABEL], {"status": report})
    except kubernetes.client.ApiException as e:
        if e.status != 404:  # the run is gone already
            raise


@kopf.on.delete("kontinue.dev", "v1alpha1", "trainingruns")
def deleted(name, logger, **_):
    logger.info(f"run {name} is being deleted")  # a finalizer: deletion waits for this handler
