"""Spec -> trainer pod manifest: a pure function, so tests validate it against the Pod schema."""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

from kontinue.api.contract import ATTEMPT_ENV, RUN_UID_ENV
from kontinue.api.manifests import Problem
from kontinue.api.models import RESERVED_VOLUMES, TrainingRun, TransferRun, VolumeSpec, path_within

GROUP = "kontinue.dev"
RUN_LABEL = f"{GROUP}/run"
ATTEMPT_LABEL = f"{GROUP}/attempt"
RUN_DIR_ANNOTATION = f"{GROUP}/run-dir"
CONTAINER = "trainer"
SCRATCH = RESERVED_VOLUMES["scratch"]
SPEC_ENV = "KONTINUE_SPEC"
# Secret keys the spec's checkpoint.secretRef names -> the variables kontinue.storage reads.
SECRET_KEYS = {"endpoint": "KONTINUE_S3_ENDPOINT", "accessKey": "KONTINUE_S3_ACCESS_KEY",
               "secretKey": "KONTINUE_S3_SECRET_KEY", "region": "KONTINUE_S3_REGION",
               "secure": "KONTINUE_S3_SECURE"}
OPTIONAL_SECRET_KEYS = {"region", "secure"}
NON_ROOT_UID = 1000
# Names made from a run's own: its pods (<name>-<attempt>, <name>-cleanup) and its events
# (<name>.<16 hex digits>, kontinue.operator.handlers); Kubernetes takes at most 253 characters.
MAX_RUN_NAME = 253 - len(".") - 16


def pod_name(run_name: str, attempt: int) -> str:
    return f"{run_name}-{attempt}"


def run_label(run_name: str) -> str:
    """Label values stop at 63 characters; longer run names are shortened with a hash."""
    if len(run_name) <= 63:
        return run_name
    return f"{run_name[:52]}-{hashlib.sha256(run_name.encode()).hexdigest()[:10]}"


def _resources(run: TrainingRun) -> dict[str, Any]:
    wanted = run.spec.resources
    requests: dict[str, str] = {}
    if wanted.cpu is not None:
        requests["cpu"] = str(wanted.cpu)
    if wanted.memory is not None:
        requests["memory"] = str(wanted.memory)
    limits = {"memory": requests["memory"]} if "memory" in requests else {}
    if wanted.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(wanted.gpus)
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _environment(run: TrainingRun) -> list[dict[str, Any]]:
    """Caches on scratch (the root filesystem is read-only) and S3 credentials from the Secret only."""
    env = [
        {"name": "HOME", "value": f"{SCRATCH}/home"},
        {"name": "HF_HOME", "value": f"{SCRATCH}/huggingface"},
        {"name": "TORCH_HOME", "value": f"{SCRATCH}/torch"},
        {"name": "MPLCONFIGDIR", "value": f"{SCRATCH}/matplotlib"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    secret = run.spec.checkpoint.secret_ref
    if secret is not None:
        env += [{"name": variable, "valueFrom": {"secretKeyRef": {
                    "name": secret.name, "key": key, "optional": key in OPTIONAL_SECRET_KEYS}}}
                for key, variable in SECRET_KEYS.items()]
    return env


def _spec_variable(run: TrainingRun) -> dict[str, Any]:
    # Without volumes: the pod mounts them, the trainer only opens paths (and an older trainer
    # image, which does not know the field, still accepts the spec).
    document = {"apiVersion": run.api_version, "kind": run.kind,
                "metadata": {"name": run.metadata.name, "namespace": run.metadata.namespace},
                "spec": run.spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"volumes"})}
    return {"name": SPEC_ENV, "value": json.dumps(document, sort_keys=True)}


def _locked_down_pod(body: dict[str, Any], run: TrainingRun, name: str, labels: dict[str, str],
                     container: dict[str, Any], *, shared_memory: bool, grace_seconds: int) -> dict[str, Any]:
    """A pod of the run: its volumes, placement and Secret, non-root on a read-only root
    filesystem with no capabilities and no API token, owned by the run."""
    spec = run.spec
    empty_dirs: dict[str, dict[str, str]] = {"scratch": {}, "tmp": {}}
    if shared_memory:  # NCCL and DataLoader workers need more shared memory than the default 64 MiB
        empty_dirs["dshm"] = {"medium": "Memory"}
    volumes = [{"name": key, "emptyDir": source} for key, source in empty_dirs.items()]
    mounts = [{"name": key, "mountPath": RESERVED_VOLUMES[key]} for key in empty_dirs]
    for volume in spec.volumes:
        volumes.append({"name": volume.name, "persistentVolumeClaim": {
            "claimName": volume.claim_name, "readOnly": volume.read_only}})
        mount = {"name": volume.name, "mountPath": volume.mount_path, "readOnly": volume.read_only}
        if volume.sub_path:
            mount["subPath"] = volume.sub_path
        mounts.append(mount)
    container = {
        "name": CONTAINER,
        "image": container.pop("image"),
        "imagePullPolicy": "IfNotPresent",
        **container,
        "env": _environment(run) + container.get("env", []),
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True, "runAsUser": NON_ROOT_UID, "runAsGroup": NON_ROOT_UID,
            "fsGroup": NON_ROOT_UID, "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [t.model_dump(mode="json", by_alias=True, exclude_none=True)
                                   for t in spec.resources.tolerations]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": run.metadata.namespace or "default",
            "labels": {"app.kubernetes.io/managed-by": "kontinue", RUN_LABEL: run_label(run.metadata.name), **labels},
            "annotations": {RUN_DIR_ANNOTATION: run.run_directory()},
            "ownerReferences": [{
                "apiVersion": body["apiVersion"], "kind": body["kind"], "name": run.metadata.name,
                "uid": body["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": pod_spec,
    }


LOST_NODE_TAINTS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")


def _lost_node_tolerations(run: TrainingRun, seconds: int) -> list[dict[str, Any]]:
    """How long the pod stays bound to a node that stopped reporting before the taint manager
    evicts it (Kubernetes' default is 300 s: five GPU-minutes lost per spot reclaim). Tolerations
    the spec gives for these taints win."""
    named = {toleration.key for toleration in run.spec.resources.tolerations}
    return [{"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}
            for key in LOST_NODE_TAINTS if key not in named]


def build_trainer_pod(body: dict[str, Any], run: TrainingRun, attempt: int, *, image: str,
                      grace_seconds: int = 120, node_lost_seconds: int = 60) -> dict[str, Any]:
    """The pod of one attempt: `kontinue train` on the run directory, locked down, owned by the run.

    `body` is the TrainingRun object as the API returned it (for its uid); `run` its parsed form.
    """
    container = {
        "image": run.spec.image or image,
        "command": ["kontinue", "train"],
        "args": ["--spec", f"env:{SPEC_ENV}", "--run-dir", run.run_directory(), "--scratch", f"{SCRATCH}/work"],
        # uid and attempt: which run and attempt may write the run directory (kontinue.trainer.ownership)
        "env": [_spec_variable(run), {"name": RUN_UID_ENV, "value": body["metadata"]["uid"]},
                {"name": ATTEMPT_ENV, "value": str(attempt)}],
        "resources": _resources(run),
    }
    pod = _locked_down_pod(body, run, pod_name(run.metadata.name, attempt),
                           {"app.kubernetes.io/name": "kontinue-trainer", ATTEMPT_LABEL: str(attempt)},
                           container, shared_memory=bool(run.spec.resources.gpus), grace_seconds=grace_seconds)
    if run.spec.resources.priority_class_name:
        pod["spec"]["priorityClassName"] = run.spec.resources.priority_class_name
    pod["spec"]["tolerations"] = pod["spec"].get("tolerations", []) + _lost_node_tolerations(run, node_lost_seconds)
    return pod


def cleanup_pod_name(run_name: str) -> str:
    return f"{run_name}-cleanup"  # never an attempt's name: those end in a number


def build_cleanup_pod(body: dict[str, Any], run: TrainingRun, *, image: str) -> dict[str, Any]:
    """The pod that deletes a deleted run's directory (spec.deleteRunDirectory): it sees the run's
    volumes and Secret as its trainer did, so the operator itself needs neither."""
    container = {
        "image": run.spec.image or image,
        "command": ["kontinue", "delete-run-dir"],
        "args": [run.run_directory()],
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    }
    return _locked_down_pod(body, run, cleanup_pod_name(run.metadata.name),
                            {"app.kubernetes.io/name": "kontinue-cleanup"}, container,
                            shared_memory=False, grace_seconds=30)


def _file_path(uri: str) -> str | None:
    """The normalised path of a file:///path or /path URI; None for s3:// URIs."""
    path = uri.removeprefix("file://")
    return posixpath.normpath(path) if path.startswith("/") else None


def _volume_holding(path: str, volumes: list[VolumeSpec]) -> VolumeSpec | None:
    return next((volume for volume in volumes if path_within(path, volume.mount_path)), None)


def pod_problems(run: TrainingRun | TransferRun) -> list[Problem]:
    """What cannot work inside a trainer pod, which sees no files but its volumes: file paths in
    spec.checkpoint.storage (on no writable volume) and spec.data (on no volume); and a run name
    too long for the names of its pods and events."""
    spec, problems = run.spec, []
    if len(run.metadata.name) > MAX_RUN_NAME:
        problems.append(Problem("metadata.name", (
            f"{len(run.metadata.name)} characters: at most {MAX_RUN_NAME}, so that the names of the run's pods "
            "(<name>-<attempt>) and events (<name>.<hash>) stay within Kubernetes' 253")))
    storage = _file_path(spec.checkpoint.storage)
    if storage is not None:
        volume = _volume_holding(storage, spec.volumes)
        if volume is None:
            problems.append(Problem("spec.checkpoint.storage", (
                f"{spec.checkpoint.storage} is on no volume: the trainer pod's root filesystem is read-only; "
                "mount a PersistentVolumeClaim there with spec.volumes")))
        elif volume.read_only:
            problems.append(Problem("spec.checkpoint.storage", (
                f"{spec.checkpoint.storage} is on volume {volume.name}, which is mounted readOnly; "
                "checkpoints need a writable volume")))
    for name in ("train", "validation", "test"):
        uri = getattr(spec.data, name)
        path = _file_path(uri) if uri else None
        if path is not None and _volume_holding(path, spec.volumes) is None:
            problems.append(Problem(f"spec.data.{name}", (
                f"{uri} is on no volume: the trainer pod sees no files but its volumes (data in the trainer "
                "image is not supported); mount the PersistentVolumeClaim that holds it with spec.volumes")))
    return problems
