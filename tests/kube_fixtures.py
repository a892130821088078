"""Kubernetes test harness on a real control plane: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler (tests/control_plane.py, once per session), a kubelet that runs the pods bound
to its nodes as local processes, and the operator as a separate process with its own credentials.

Registered from tests/conftest.py with ``pytest_plugins = [..., "tests.kube_fixtures"]``.

Fixtures:

* ``control_plane`` (session) -> :class:`ControlPlane`, with the CRDs from crds/ installed. Without
  envtest's binaries (``KUBEBUILDER_ASSETS``) every test that needs it is skipped, saying how to get them.
* ``kube`` -> :class:`KubeCluster`: an admin client in a fresh namespace of its own (labelled
  PodSecurity ``restricted``), with a journal of every write to pods and runs there.
* ``kubelet`` -> :class:`Kubelet`: Node objects of its own (GPU capacity, a Lease renewed every
  second) and the pods the scheduler binds to them run as local processes, reported through
  ``pods/status``; their logs are served to the API server (``pods/log``) over HTTPS.
* ``operator_process`` -> :class:`OperatorProcess`: ``python -m kontinue operator --standalone
  --namespace NS`` as a subprocess authenticated as a ServiceAccount bound to deploy/operator.yaml's
  ClusterRole, so the shipped RBAC is what every operator test exercises.

Everything an API does, the API server does (schemas, pruning, CEL, RBAC, PodSecurity admission,
garbage collection, eviction, scheduling, node lifecycle). What the kubelet does not do:

* Only ``containers[0]`` runs, as a local process (no init or sidecar containers, every pod behaves
  as ``restartPolicy: Never``); resources, probes, securityContext and readOnlyRootFilesystem are
  not enforced; paths outside the mounts are the host's.
"""

from __future__ import annotations

import base64
import datetime
import http.server
import itertools
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.control_plane import ADMIN_TOKEN, HOW_TO_GET_THEM, ControlPlane, assets, kubeconfig

REPO = Path(__file__).resolve().parents[1]
RUN_LABEL = "kontinue.dev/run"
TERMINAL = ("Succeeded", "Failed")
OPERATOR_ROLE = "kontinue-operator"  # deploy/operator.yaml's ClusterRole
JOURNALED = ("pods", "trainingruns", "transferruns")
logger = logging.getLogger(__name__)


def _now(offset: float = 0.0) -> str:
    """RFC 3339 in UTC with seconds, as the API server writes timestamps."""
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body
        details = body if not isinstance(body, dict) else f"{body.get('reason')}: {body.get('message')}"
        super().__init__(f"HTTP {status}: {details}")


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str | None = None, *,
             interval: float = 0.1, dump: Callable[[], str] | None = None) -> Any:
    """Poll `predicate` until it returns something truthy and return that.

    Exceptions from the predicate (a field not there yet) count as "not yet"; the last one is
    reported on timeout, together with `dump()` (the current state of the cluster)."""
    deadline = time.monotonic() + timeout
    error = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - reported below
            error = e
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    message = [f"Timed out after {timeout:g}s waiting for {what or getattr(predicate, '__name__', predicate)}"]
    if error is not None:
        message.append(f"Last error from the predicate: {error!r}")
    if dump is not None:
        try:
            message.append(dump())
        except Exception as e:  # noqa: BLE001
            message.append(f"(dumping the cluster failed: {e!r})")
    raise TimeoutError("\n".join(message))


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


class Client:
    """A small JSON client for one bearer token (admin by default), by plural, kind or path."""

    def __init__(self, plane: ControlPlane, token: str = ADMIN_TOKEN, namespace: str = "default"):
        self.plane, self.token, self.namespace = plane, token, namespace
        self._local = threading.local()
        self._resources: dict[str, Resource] = {}

    @property
    def url(self) -> str:
        return self.plane.url

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["Authorization"] = f"Bearer {self.token}"
        return session

    def request(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                content_type: str = "application/json", missing_ok: bool = False, raw: bool = False,
                timeout: float = 30) -> Any:
        # verify= per request: a Session's is overridden by REQUESTS_CA_BUNDLE when that is set
        response = self._session().request(
            method, self.url + path, params=params, timeout=timeout, verify=str(self.plane.ca),
            data=None if body is None else json.dumps(body), headers={"Content-Type": content_type})
        if response.status_code == 404 and missing_ok:
            return None
        if raw and response.status_code < 400:
            return response.text
        try:
            payload = response.json()
        except ValueError:
            payload = response.text
        if response.status_code >= 400:
            raise ApiError(response.status_code, payload)
        return payload

    # -- discovery ------------------------------------------------------------------------------

    def resource(self, ref: str) -> Resource:
        """By plural (`pods`), kind (`Pod`) or path (`v1/pods`, `kontinue.dev/v1alpha1/trainingruns`)."""
        if ref not in self._resources:
            self._discover()
        if ref not in self._resources:
            raise KeyError(f"the API server serves no resource {ref!r}")
        return self._resources[ref]

    def _discover(self) -> None:
        versions = [("", "v1")] + [
            (group["name"], group["preferredVersion"]["version"])
            for group in self.request("GET", "/apis")["groups"]]
        for group, version in versions:
            prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
            for item in self.request("GET", prefix)["resources"]:
                if "/" in item["name"]:
                    continue
                resource = Resource(group, version, item["name"], item["kind"], item["namespaced"])
                path = f"{group}/{version}/{item['name']}".lstrip("/")
                for key in (path, item["name"], item["kind"]):
                    self._resources.setdefault(key, resource)
                self._resources[f"{group}/{version}/{item['kind']}".lstrip("/")] = resource

    def path(self, ref: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        resource = self.resource(ref)
        path = resource.prefix
        if resource.namespaced and namespace:
            path += f"/namespaces/{namespace}"
        path += f"/{resource.plural}"
        return path + "".join(f"/{part}" for part in (name, subresource) if part)

    # -- verbs ----------------------------------------------------------------------------------

    def create(self, obj: dict, namespace: str | None = None) -> dict:
        resource = self.resource(f"{obj['apiVersion']}/{obj['kind']}")
        namespace = obj.get("metadata", {}).get("namespace") or namespace or self.namespace
        return self.request("POST", self.path(resource.plural if not resource.group else
                                              f"{resource.group}/{resource.version}/{resource.plural}",
                                              namespace), body=obj)

    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        """The object, or None if there is none."""
        return self.request("GET", self.path(resource, namespace, name), missing_ok=True)

    def list(self, resource: str, namespace: str | None = None, labels: dict | str | None = None,
             fields: str | None = None) -> list[dict]:
        """`labels`: a selector string, or a dict where a None value means "has the label"."""
        if isinstance(labels, dict):
            labels = ",".join(key if value is None else f"{key}={value}" for key, value in labels.items())
        params = {key: value for key, value in (("labelSelector", labels), ("fieldSelector", fields)) if value}
        return self.request("GET", self.path(resource, namespace), params=params)["items"]

    def patch(self, resource: str, namespace: str | None, name: str, patch: Any, *,
              subresource: str | None = None, type: str = "merge") -> dict:
        """`type`: merge (RFC 7386), json (RFC 6902) or strategic."""
        content_type = {"merge": "application/merge-patch+json", "json": "application/json-patch+json",
                        "strategic": "application/strategic-merge-patch+json"}[type]
        return self.request("PATCH", self.path(resource, namespace, name, subresource),
                            body=patch, content_type=content_type)

    def delete(self, resource: str, namespace: str | None, name: str, *, grace: int | None = None,
               propagation: str | None = None, uid: str | None = None, missing_ok: bool = True) -> dict | None:
        options = {key: value for key, value in (("gracePeriodSeconds", grace), ("propagationPolicy", propagation),
                                                  ("preconditions", uid and {"uid": uid})) if value is not None}
        try:
            return self.request("DELETE", self.path(resource, namespace, name),
                                body=options or None, missing_ok=missing_ok)
        except ApiError as e:
            if missing_ok and e.status == 409 and uid:  # a newer object of that name: not ours to delete
                return None
            raise

    def evict(self, pod: str, namespace: str | None = None, grace: int | None = None) -> dict:
        """The Eviction API (what `kubectl drain` uses): honours PodDisruptionBudgets (429 if one forbids)."""
        namespace = namespace or self.namespace
        body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": namespace}}
        if grace is not None:
            body["deleteOptions"] = {"gracePeriodSeconds": grace}
        return self.request("POST", self.path("pods", namespace, pod, "eviction"), body=body)

    def request_token(self, service_account: str, namespace: str, seconds: int = 7200) -> str:
        """A token of the ServiceAccount from the TokenRequest API (what `kubectl create token` does)."""
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "spec": {"expirationSeconds": seconds}}
        return self.request("POST", self.path("serviceaccounts", namespace, service_account, "token"),
                            body=request)["status"]["token"]

    def kubeconfig(self, path: str | os.PathLike, *, token: str | None = None, user: str = "admin",
                   namespace: str | None = None) -> Path:
        """A kubeconfig for this client's token, or another one (for `KUBECONFIG=...`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(kubeconfig(self.url, self.plane.ca, user, token or self.token, namespace or self.namespace))
        return path

    def apply_all(self, documents: Iterable[dict], namespace: str | None = None) -> None:
        """Create each document, or replace it where it exists (cluster setup, not what tests check)."""
        for document in documents:
            if not document:
                continue
            try:
                self.create(document, namespace)
            except ApiError as e:
                if e.status != 409:
                    raise


class Journal:
    """Every write to pods and runs in one namespace, in order, from watches that started before the
    test's first write: for asserting on states too brief to catch by polling (pod lifetimes,
    every status a run went through). Entries: (resourceVersion, plural, watch event)."""

    def __init__(self, client: Client, namespace: str, plurals: Iterable[str] = JOURNALED):
        self.client, self.namespace = client, namespace
        self.entries: list[tuple[int, str, dict]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []
        for plural in plurals:
            start = self.client.request("GET", self.client.path(plural, namespace), params={"limit": 1})
            thread = threading.Thread(target=self._watch, args=(plural, start["metadata"]["resourceVersion"]),
                                      name=f"journal-{plural}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _watch(self, plural: str, version: str) -> None:
        while not self._stop.is_set():
            try:
                response = self.client._session().get(
                    self.client.url + self.client.path(plural, self.namespace), stream=True, timeout=(10, 30),
                    verify=str(self.client.plane.ca),
                    params={"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true",
                            "timeoutSeconds": "20"})
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    event = json.loads(line)
                    if event["type"] == "ERROR":  # 410 Gone cannot happen within a test: say so loudly
                        logger.error("journal watch of %s failed: %s", plural, event["object"])
                        return
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        with self._lock:
                            self.entries.append((int(version), plural, event))
            except (requests.RequestException, ValueError):
                if not self._stop.wait(0.2):
                    continue

    def settle(self, client: Client) -> None:
        """Wait until the journal holds the current version of every object there is now (the
        watches lag a little), then a moment more for deletions, which leave nothing to compare."""
        def caught_up() -> bool:
            seen = {(plural, event["object"]["metadata"]["resourceVersion"]) for _, plural, event in list(self.entries)}
            return all((plural, obj["metadata"]["resourceVersion"]) in seen
                       for plural in JOURNALED for obj in client.list(plural, self.namespace))
        wait_for(caught_up, 10, "the journal to catch up")
        time.sleep(0.3)

    def close(self) -> None:
        self._stop.set()


class KubeCluster(Client):
    """The test's view of the cluster: an admin client in its own namespace, with a journal."""

    _count = itertools.count(1)

    def __init__(self, plane: ControlPlane, name: str = "tests"):
        slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40].strip("-")
        super().__init__(plane, namespace=f"t{next(self._count)}-{slug}")
        self.dumpers: list[Callable[[], str]] = [plane.dump]
        self.journal: Journal | None = None

    def start(self, *, pod_security: str = "restricted") -> KubeCluster:
        self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace, "labels": {
            "pod-security.kubernetes.io/enforce": pod_security,
            "pod-security.kubernetes.io/enforce-version": "latest"}}})
        self.journal = Journal(self, self.namespace)
        return self

    def stop(self) -> None:
        if self.journal is not None:
            self.journal.close()
        self.delete("namespaces", None, self.namespace)  # the namespace controller empties it

    def api_client(self, token: str | None = None):
        """A `kubernetes.client.ApiClient` for the typed API classes (CoreV1Api(kube.api_client()))."""
        import kubernetes

        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        configuration.ssl_ca_cert = str(self.plane.ca)
        configuration.api_key = {"authorization": f"Bearer {token or self.token}"}
        return kubernetes.client.ApiClient(configuration)

    def service_account_token(self, name: str, cluster_role: str | None = None) -> str:
        """A ServiceAccount in the test's namespace, bound (cluster-wide) to `cluster_role`; its token."""
        self.apply_all([{"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}}], self.namespace)
        if cluster_role:
            self.apply_all([{
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": f"{self.namespace}-{name}"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": self.namespace}]}])
        return self.request_token(name, self.namespace)

    def events(self, namespace: str | None = None, involved_name: str | None = None) -> list[dict]:
        """Core v1 Events, oldest first; optionally only those about objects with that name."""
        fields = f"involvedObject.name={involved_name}" if involved_name else None
        items = self.list("events", namespace or self.namespace, fields=fields)
        return sorted(items, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def writes(self) -> list[tuple[int, str, dict]]:
        """The journal: every write to pods and runs in the namespace so far, in order."""
        self.journal.settle(self)
        return sorted(list(self.journal.entries), key=lambda entry: entry[0])

    def history(self, resource: str, namespace: str | None, name: str) -> list[dict | None]:
        """Every version the object had (None marks a deletion), from the journal."""
        plural = self.resource(resource).plural
        return [None if event["type"] == "DELETED" else event["object"]
                for _, kind, event in self.writes()
                if kind == plural and event["object"]["metadata"]["name"] == name
                and event["object"]["metadata"].get("namespace") == (namespace or self.namespace)]

    # -- waiting and debugging ------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, what: str | None = None,
                 *, interval: float = 0.1) -> Any:
        return wait_for(predicate, timeout, what, interval=interval, dump=self.dump)

    def wait_for_object(self, resource: str, namespace: str | None, name: str,
                        predicate: Callable[[dict | None], Any], timeout: float = 30.0,
                        what: str | None = None) -> Any:
        """Wait until predicate(object or None) is truthy; return the object (or the result if the
        object is gone). On timeout the message shows the object as it is."""
        def check() -> Any:
            obj = self.get(resource, namespace, name)
            result = predicate(obj)
            return (obj or result) if result else None

        def dump() -> str:
            obj = self.get(resource, namespace, name)
            (obj or {}).get("metadata", {}).pop("managedFields", None)
            return f"--- {resource} {namespace}/{name}:\n{yaml.safe_dump(obj)}\n{self.dump(namespace)}"
        return wait_for(check, timeout, what or f"{resource} {namespace}/{name}", dump=dump)

    def dump(self, namespace: str | None = None) -> str:
        """The custom resources and pods (status only), the latest events, and what the kubelet
        and operator fixtures add (log tails)."""
        namespace = namespace or self.namespace
        lines = []
        for resource in ("trainingruns", "transferruns", "pods"):
            for obj in self.list(resource, namespace):
                meta = obj["metadata"]
                shown = obj if resource != "pods" else {
                    "metadata": {k: meta.get(k) for k in ("labels", "deletionTimestamp", "uid")},
                    "spec": {"nodeName": obj["spec"].get("nodeName")}, "status": obj.get("status")}
                lines.append(f"--- {self.resource(resource).kind} {meta.get('namespace')}/{meta['name']}:\n"
                             + yaml.safe_dump(shown, width=120))
        lines.append("--- latest events:")
        for event in self.events(namespace)[-15:]:
            involved = event.get("involvedObject", {})
            lines.append(f"  {event.get('type')} {involved.get('kind')}/{involved.get('name')} "
                         f"{event.get('reason')}: {event.get('message')}")
        lines += [dumper() for dumper in self.dumpers]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The kubelet

class _ConfigError(Exception):
    """The container cannot be configured (missing Secret or key): CreateContainerConfigError."""


@dataclass
class _PodRecord:
    uid: str
    namespace: str
    name: str
    image: str
    container: str
    dir: Path
    grace: float
    message_policy: str
    node: str = ""
    proc: subprocess.Popen | None = None
    container_id: str = ""
    started_at: str | None = None
    waiting: str | None = None  # why the container is not running yet
    kill_at: float | None = None  # when terminating: SIGKILL after this (monotonic)
    forced: tuple[int, str] | None = None  # (exitCode, reason) to report instead of the real one
    done: bool = False  # the final status was reported
    held: bool = False  # frozen by `Kubelet.hold` until it is told to stop

    @property
    def log_path(self) -> Path:
        return self.dir / "container.log"

    @property
    def termination_log(self) -> Path:
        return self.dir / "termination-log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _merge_conditions(old: list[dict], updates: dict[str, tuple]) -> list[dict]:
    """Pod conditions by type; updates: {type: (status, reason, message)}."""
    merged = {condition["type"]: dict(condition) for condition in old or []}
    for kind, (status, reason, message) in updates.items():
        condition = merged.setdefault(kind, {"type": kind})
        if condition.get("status") != status:
            condition["lastTransitionTime"] = _now()
        condition.update(status=status, lastProbeTime=None)
        for key, value in (("reason", reason), ("message", message)):
            if value:
                condition[key] = value
            else:
                condition.pop(key, None)
    return list(merged.values())


def _path_rewriter(mounts: dict[str, Path], shared: Iterable[Path]) -> Callable[[str], str]:
    """Map container paths under a mount to host paths, leaving host-shared paths alone."""
    if not mounts:
        return lambda text: text
    shared = tuple(str(path) for path in shared)
    pattern = re.compile(r"(?<![\w.-])(" + "|".join(
        re.escape(p) for p in sorted(mounts, key=len, reverse=True)) + r")(?![\w.-])")

    def replace(m: re.Match) -> str:
        if m.string.startswith(shared, m.start()):
            return m.group(0)
        return str(mounts[m.group(1)])
    return lambda text: pattern.sub(replace, text)


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) references in command, args and env values; $$( escapes."""
    return re.sub(r"\$(\$|\(([A-Za-z_][A-Za-z0-9_]*)\))",
                  lambda m: "$" if m.group(1) == "$" else env.get(m.group(2), m.group(0)), text)


def _image_unreachable(image: str) -> bool:
    registry = image.split("/", 1)[0] if "/" in image else ""
    return registry.split(":")[0].endswith(".invalid")


class Kubelet:
    """Plays the nodes: Node objects with GPU capacity and a Lease renewed every second, and the pods
    the scheduler binds to them run as local processes and are reported like a kubelet does.

    `spec.containers[0]`'s command + args run with its env (values, Secret/ConfigMap keys, pod
    fields), its volumes mapped to host directories (emptyDir: a fresh directory per pod;
    persistentVolumeClaim: a directory per claim that outlives pods; hostPath: itself;
    secret/configMap: the keys as files), and the mount paths rewritten in args and env values
    (except under `shared_paths`, host paths every "node" sees, such as pytest's temp root). A
    leading `kontinue` runs `sys.executable -m kontinue`. The termination message file is passed
    as `KONTINUE_TERMINATION_LOG`. Images from a `*.invalid` registry never pull. Container logs
    are served over HTTPS to the API server, which proxies `pods/log` (kubectl logs) to them.
    """

    def __init__(self, kube: KubeCluster, root: Path, *, shared_paths: Iterable[Path] = (),
                 selector: str | None = None, interval: float = 0.1):
        self.kube, self.root, self.selector, self.interval = kube, Path(root), selector, interval
        self.shared_paths = [Path(p) for p in shared_paths]
        self.nodes: list[str] = []  # this kubelet's nodes, in the order they were added
        self.started: list[str] = []  # names of the pods whose process started, in order
        self.errors: list[str] = []  # exceptions of the loop, for the dump
        self._lost: set[str] = set()  # nodes that died: no heartbeat, no status, processes killed
        self._pods: dict[str, _PodRecord] = {}  # by uid: pods the API still has
        self._orphans: list[_PodRecord] = []  # processes of pods deleted for good, being stopped
        self._records: list[_PodRecord] = []  # every pod ever admitted, for logs()
        self._overrides: dict[str, list[str]] = {}
        self._claims: set[tuple[str, str]] = set()  # (namespace, name) created in the API
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
        self._heart = threading.Thread(target=self._heartbeats, name="kubelet-leases", daemon=True)
        self._server = _LogServer(self, kube.plane)

    @property
    def node_name(self) -> str:
        """The first node (where a test with one node finds its pods)."""
        return self.nodes[0]

    # -- test-facing API ------------------------------------------------------------------------

    def start(self, nodes: int = 1, gpus: int = 8) -> Kubelet:
        self.kube.dumpers.append(self.dump)
        self._server.start()
        for _ in range(nodes):
            self.add_node(gpus=gpus)
        self._thread.start()
        self._heart.start()
        return self

    def add_node(self, name: str | None = None, *, gpus: int = 8, labels: dict | None = None,
                 taints: list[dict] | None = None) -> str:
        """Register a Node (capacity, Ready, its Lease) and wait until the node-lifecycle controller
        has lifted the not-ready taint that admission puts on every new Node."""
        name = name or f"{self.kube.namespace}-node-{len(self.nodes) + 1}"
        self.kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **(labels or {})}},
            "spec": {"taints": taints} if taints else {}})
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "110", "ephemeral-storage": "100Gi",
                    "nvidia.com/gpu": str(gpus)}
        self.kube.patch("nodes", None, name, {"status": {
            "capacity": capacity, "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self._server.port}},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "the test harness plays this node", "lastHeartbeatTime": _now(),
                            "lastTransitionTime": _now()}],
            "nodeInfo": {"kubeletVersion": "v1.36.2", "operatingSystem": "linux", "architecture": "amd64",
                         "containerRuntimeVersion": "harness://1", "kernelVersion": "", "osImage": "",
                         "machineID": "", "systemUUID": "", "bootID": "", "kubeProxyVersion": ""}}},
            subresource="status")
        self._renew(name)
        with self._lock:
            self.nodes.append(name)
        self.kube.wait_for(lambda: not any(t["key"] == "node.kubernetes.io/not-ready" for t in
                                           (self.kube.get("nodes", None, name)["spec"].get("taints") or [])),
                           30, f"node {name} to become schedulable")
        return name

    def lose_node(self, name: str) -> None:
        """The node dies: its processes are killed, and nothing reports for it any more (no Lease
        renewal, no pod status). The node-lifecycle controller marks it NotReady and taints it; the
        taint-eviction controller then deletes its pods, which stay Terminating (no kubelet is left
        to finish the deletion) until someone force-deletes them."""
        with self._lock:
            self._lost.add(name)
            for record in [r for r in self._pods.values() if r.node == name]:
                self._kill_group(record)
                if record.proc is not None:
                    record.proc.wait(10)
                self._pods.pop(record.uid)

    def partition_node(self, name: str) -> None:
        """The node drops off the network: nothing reports for it any more (as `lose_node`), but its
        processes live on, frozen (SIGSTOP) until `thaw` lets them go on, still unseen by the API
        server: a trainer that outlived its pod, as on a partitioned node."""
        with self._lock:
            self._lost.add(name)
            for record in self._pods.values():
                if record.node == name and record.alive:
                    os.killpg(record.proc.pid, signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        """The partitioned node's processes run again (the node still reports nothing)."""
        with self._lock:
            for record in self._pods.values():
                if record.node == name and record.alive:
                    os.killpg(record.proc.pid, signal.SIGCONT)

    def hold(self, pod_name: str, namespace: str | None = None) -> None:
        """Freezes the pod's processes (SIGSTOP) until the node stops it: SIGTERM then goes with a
        SIGCONT. A test pins the step a preemption hits this way, however slow the API is to act."""
        with self._lock:
            record = self._find(pod_name, namespace)
            os.killpg(record.proc.pid, signal.SIGSTOP)
            record.held = True

    def _terminate(self, record: _PodRecord) -> None:
        record.proc.send_signal(signal.SIGTERM)
        if record.held:
            self._kill_group(record, signal.SIGCONT)

    def exit_code(self, pod_name: str, namespace: str | None = None) -> int | None:
        """The exit code of the latest process of that pod (None while it runs)."""
        record = self._find(pod_name, namespace, live=False)
        return None if record.proc is None else record.proc.poll()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._heart.join(10)
        with self._lock:
            for record in list(self._pods.values()) + self._orphans:
                self._kill_group(record)
                if record.proc is not None:
                    record.proc.wait(10)
        for name in self.nodes:  # their pods are then orphans, which the pod GC deletes
            self.kube.delete("nodes", None, name)
        for namespace, claim in self._claims:
            self.kube.delete("persistentvolumes", None, f"{namespace}-{claim}")
        self._server.stop()

    def running_pods(self) -> list[str]:
        with self._lock:
            return sorted(r.name for r in self._pods.values() if r.alive)

    def wait_until_running(self, pod_name: str, timeout: float = 30.0, namespace: str | None = None) -> dict:
        namespace = namespace or self.kube.namespace
        self.kube.wait_for(lambda: pod_name in self.running_pods(), timeout, f"pod {pod_name} to run")
        return self.kube.wait_for_object("pods", namespace, pod_name,
                                         lambda pod: pod and pod["status"]["phase"] == "Running", timeout)

    def logs(self, pod_name: str, namespace: str | None = None) -> str:
        """stdout and stderr of the latest pod with that name."""
        record = self._find(pod_name, namespace, live=False)
        return record.log_path.read_text(errors="replace") if record.log_path.exists() else ""

    def claim_dir(self, claim: str, namespace: str | None = None) -> Path:
        """The host directory behind a PersistentVolumeClaim (one per claim, outliving pods). The
        first call also creates the claim in the API, bound to a PersistentVolume of that
        directory: the scheduler places no pod whose claim is missing or unbound."""
        namespace = namespace or self.kube.namespace
        directory = self.root / "claims" / namespace / claim
        if (namespace, claim) not in self._claims:
            directory.mkdir(parents=True, exist_ok=True)
            volume = f"{namespace}-{claim}"
            size = {"storage": "10Gi"}
            self.kube.apply_all([
                {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume}, "spec": {
                    "capacity": size, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                    "hostPath": {"path": str(directory)},
                    "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                 "namespace": namespace, "name": claim}}},
                {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                 "metadata": {"name": claim, "namespace": namespace}, "spec": {
                     "accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": volume,
                     "resources": {"requests": size}}}])
            self.kube.wait_for_object("persistentvolumeclaims", namespace, claim,
                                      lambda pvc: (pvc.get("status") or {}).get("phase") == "Bound", 30)
            self._claims.add((namespace, claim))
        return directory

    def override_command(self, run: str, argv: list[str] | None) -> None:
        """Pods of that run (label kontinue.dev/run) started from now on run argv instead of
        their command and args (env and mounts still apply). None restores the pod's own."""
        if argv is None:
            self._overrides.pop(run, None)
        else:
            self._overrides[run] = list(argv)

    def preempt(self, pod_name: str, reason: str = "TerminationByKubelet", grace: int = 30, *,
                message: str | None = None, namespace: str | None = None, wait: bool = True) -> None:
        """As the kubelet itself does when it must stop a pod (node-pressure eviction, graceful
        node shutdown): the DisruptionTarget condition, then a graceful delete; the loop then
        SIGTERMs the process, SIGKILLs it after the grace period, reports it and removes the pod.
        (The scheduler, the Eviction API and the taint manager do their own: see the tests.)"""
        record = self._find(pod_name, namespace)
        message = message or f"{reason}: the harness disrupted the pod"
        with self._lock:
            self._patch_status(record, lambda status: {**status, "conditions": _merge_conditions(
                status.get("conditions"), {"DisruptionTarget": ("True", reason, message)})})
            self.kube.delete("pods", record.namespace, pod_name, grace=grace, uid=record.uid)
        if wait:
            self.wait_gone(pod_name, record.namespace, record.uid, grace + 15)

    def wait_gone(self, pod_name: str, namespace: str | None = None, uid: str | None = None,
                  timeout: float = 45) -> None:
        namespace = namespace or self.kube.namespace
        uid = uid or self.kube.get("pods", namespace, pod_name)["metadata"]["uid"]
        self.kube.wait_for(lambda: (self.kube.get("pods", namespace, pod_name) or {}).get(
            "metadata", {}).get("uid") != uid, timeout, f"pod {pod_name} to go")

    def kill(self, pod_name: str, exit_code: int | None = None, sig: int = signal.SIGKILL,
             namespace: str | None = None) -> None:
        """Send sig to the container; with exit_code, report that code (reason Error) instead of
        what the signal gives (137 for SIGKILL): a crash of the code."""
        with self._lock:
            record = self._find(pod_name, namespace)
            if exit_code is not None:
                record.forced = (exit_code, "Completed" if exit_code == 0 else "Error")
            self._kill_group(record, sig)

    def oom(self, pod_name: str, namespace: str | None = None) -> None:
        """The kernel's OOM killer: SIGKILL, reported as exitCode 137, reason OOMKilled."""
        with self._lock:
            record = self._find(pod_name, namespace)
            record.forced = (137, "OOMKilled")
            self._kill_group(record)

    def vanish(self, pod_name: str, namespace: str | None = None) -> None:
        """Force-deleted with no last state (`kubectl delete --force --grace-period=0`, or a pod
        collector): the process dies and the pod object goes, with no final status."""
        with self._lock:
            record = self._find(pod_name, namespace)
            self._pods.pop(record.uid, None)
            self._kill_group(record)
            if record.proc is not None:
                record.proc.wait(10)
            self.kube.delete("pods", record.namespace, pod_name, grace=0, uid=record.uid)

    def dump(self) -> str:
        with self._lock:
            lines = [f"--- kubelet: nodes {self.nodes} (lost {sorted(self._lost)}), running {self.running_pods()}, "
                     f"started {self.started}"]
            lines += [f"  loop error: {error}" for error in self.errors[-3:]]
            for record in self._records[-4:]:
                tail = record.log_path.read_text(errors="replace")[-1500:] if record.log_path.exists() else ""
                lines.append(f"--- log of pod {record.name} (tail):\n{tail}")
        return "\n".join(lines)

    def _find(self, pod_name: str, namespace: str | None, live: bool = True) -> _PodRecord:
        records = list(self._pods.values()) if live else list(self._records)
        for record in reversed(records):
            if record.name == pod_name and namespace in (None, record.namespace):
                return record
        raise KeyError(f"the kubelet has no {'running ' if live else ''}pod {pod_name!r}")

    # -- the loops ------------------------------------------------------------------------------

    def _heartbeats(self) -> None:
        while not self._stop.wait(1.0):
            for name in list(self.nodes):
                if name not in self._lost:
                    try:
                        self._renew(name)
                    except Exception as e:  # noqa: BLE001 - shown in dump()
                        self.errors.append(f"lease {name}: {e!r}")

    def _renew(self, name: str) -> None:
        spec = {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _micro_now()}
        try:
            self.kube.patch("leases", "kube-node-lease", name, {"spec": spec})
        except ApiError as e:
            if e.status != 404:
                raise
            node = self.kube.get("nodes", None, name)
            self.kube.create({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {
                "name": name, "namespace": "kube-node-lease", "ownerReferences": [{
                    "apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}]},
                "spec": spec})

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self._lock:
                    self._tick()
            except Exception as e:  # noqa: BLE001 - keep going; shown in dump()
                logger.exception("kubelet loop failed")
                self.errors.append(repr(e))

    def _tick(self) -> None:
        seen = set()
        for node in [n for n in self.nodes if n not in self._lost]:
            for pod in self.kube.list("pods", None, labels=self.selector, fields=f"spec.nodeName={node}"):
                uid = pod["metadata"]["uid"]
                seen.add(uid)
                record = self._pods.get(uid)
                if record is None:
                    self._admit(pod)
                else:
                    self._sync(record, pod)
        for uid in set(self._pods) - seen:  # deleted for good by someone else: stop the process
            if self._pods[uid].node in self._lost:
                continue  # nobody on that node hears of it
            record = self._pods.pop(uid)
            if record.alive:
                self._terminate(record)
                record.kill_at = time.monotonic() + record.grace
                self._orphans.append(record)
        for record in list(self._orphans):
            if not record.alive:
                self._kill_group(record)  # what is left of the container
                self._orphans.remove(record)
            elif time.monotonic() >= record.kill_at:
                self._kill_group(record)

    def _admit(self, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        if pod.get("status", {}).get("phase") in TERMINAL:
            return  # ran here before the harness took over, or not at all
        if meta.get("deletionTimestamp"):  # deleted before it started: nothing to stop
            self.kube.delete("pods", meta["namespace"], meta["name"], grace=0, uid=meta["uid"])
            return
        if any(r.name == meta["name"] and r.namespace == meta["namespace"] and r.alive
               for r in list(self._pods.values()) + self._orphans):
            return  # the old process of that name is still stopping: never two at once
        container = spec["containers"][0]
        record = _PodRecord(
            uid=meta["uid"], namespace=meta["namespace"], name=meta["name"], image=container.get("image", ""),
            container=container["name"], dir=self.root / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}",
            grace=spec.get("terminationGracePeriodSeconds", 30),
            message_policy=container.get("terminationMessagePolicy", "File"), node=spec["nodeName"])
        record.dir.mkdir(parents=True)
        self._pods[record.uid] = record
        self._records.append(record)
        self._write_status(record, "Pending", {"waiting": {"reason": "ContainerCreating"}},
                           {"Initialized": ("True", None, None),
                            "Ready": ("False", "ContainersNotReady", None),
                            "ContainersReady": ("False", "ContainersNotReady", None)})
        if _image_unreachable(record.image):
            record.waiting = "ErrImagePull"
            self._write_status(record, "Pending", {"waiting": {"reason": "ErrImagePull", "message": (
                f'failed to pull and unpack image "{record.image}": dial tcp: lookup '
                f'{record.image.split("/")[0]}: no such host')}}, {})
            return
        self._try_start(record, pod)

    def _sync(self, record: _PodRecord, pod: dict) -> None:
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        if record.proc is None and not record.done:  # waiting for an image or its configuration
            if deleting:
                self._forget(record)
            elif record.waiting == "ErrImagePull":
                record.waiting = "ImagePullBackOff"
                self._write_status(record, "Pending", {"waiting": {"reason": "ImagePullBackOff", "message":
                                   f'Back-off pulling image "{record.image}"'}}, {})
            elif record.waiting == "CreateContainerConfigError":
                self._try_start(record, pod)
            return
        if record.done:
            if deleting:
                self._forget(record)
            return
        if deleting and record.kill_at is None:
            grace = pod["metadata"].get("deletionGracePeriodSeconds", record.grace)
            record.kill_at = time.monotonic() + grace
            self._terminate(record)
        if record.kill_at is not None and record.alive and time.monotonic() >= record.kill_at:
            self._kill_group(record)
            record.proc.wait(10)
        if not record.alive:
            self._kill_group(record)  # what is left of the container
            self._report_exit(record)
            if deleting:
                self._forget(record)

    def _forget(self, record: _PodRecord) -> None:
        """Finish a graceful deletion: the kubelet deletes the pod for good (grace 0)."""
        self._pods.pop(record.uid, None)
        self.kube.delete("pods", record.namespace, record.name, grace=0, uid=record.uid)

    # -- containers -----------------------------------------------------------------------------

    def _try_start(self, record: _PodRecord, pod: dict) -> None:
        try:
            argv, env, cwd = self._container_config(record, pod)
        except _ConfigError as e:
            if record.waiting != "CreateContainerConfigError":
                record.waiting = "CreateContainerConfigError"
                self._write_status(record, "Pending", {"waiting": {
                    "reason": "CreateContainerConfigError", "message": str(e)}}, {})
            return
        record.waiting = None
        record.container_id = f"containerd://{uuid.uuid4().hex}"
        record.started_at = _now()
        with open(record.log_path, "ab") as log:
            try:
                record.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                record.termination_log.write_text(f"exec: {e}")
                record.forced = (128, "StartError")
                self._report_exit(record)
                return
        self.started.append(record.name)
        self._write_status(record, "Running", {"running": {"startedAt": record.started_at}},
                           {"Ready": ("True", None, None), "ContainersReady": ("True", None, None)},
                           ready=True)

    def _container_config(self, record: _PodRecord, pod: dict) -> tuple[list[str], dict[str, str], Path]:
        meta, spec = pod["metadata"], pod["spec"]
        container = spec["containers"][0]
        mounts = self._mounts(record, pod, container)
        mounts[container.get("terminationMessagePath", "/dev/termination-log")] = record.termination_log
        rewrite = _path_rewriter(mounts, self.shared_paths)
        (record.dir / "home").mkdir(exist_ok=True)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": str(record.dir / "home"),
               "HOSTNAME": meta["name"], "LANG": "C.UTF-8", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "KONTINUE_TERMINATION_LOG": str(record.termination_log)}
        if "/tmp" in mounts:
            env["TMPDIR"] = str(mounts["/tmp"])
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef") or source.get("configMapRef")
            data = self._data("secrets" if "secretRef" in source else "configmaps", meta["namespace"], ref)
            env.update({source.get("prefix", "") + key: value for key, value in (data or {}).items()})
        for item in container.get("env") or []:
            if "valueFrom" in item:
                value = self._value_from(item["valueFrom"], pod)
                if value is not None:
                    env[item["name"]] = value
            else:
                env[item["name"]] = _expand(rewrite(item.get("value", "")), env)
        run = (meta.get("labels") or {}).get(RUN_LABEL)
        override = self._overrides.get(run)
        # An override is the test's own command on this machine: its paths are not the pod's.
        argv = override or [_expand(rewrite(arg), env)
                            for arg in (container.get("command") or []) + (container.get("args") or [])]
        if argv and argv[0] == "kontinue":
            argv = [sys.executable, "-m", "kontinue", *argv[1:]]
        workdir = Path(rewrite(container["workingDir"])) if container.get("workingDir") else None
        cwd = workdir if workdir and workdir.is_dir() else record.dir
        return argv, env, cwd

    def _mounts(self, record: _PodRecord, pod: dict, container: dict) -> dict[str, Path]:
        volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes") or []}
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise _ConfigError(f'volume "{mount["name"]}" is not declared in the pod')
            if "emptyDir" in volume:
                host = record.dir / "volumes" / volume["name"]
            elif "persistentVolumeClaim" in volume:
                host = self.claim_dir(volume["persistentVolumeClaim"]["claimName"], record.namespace)
            elif "hostPath" in volume:
                host = Path(volume["hostPath"]["path"])
            elif "secret" in volume or "configMap" in volume:
                host = record.dir / "volumes" / volume["name"]
                kind = "secrets" if "secret" in volume else "configmaps"
                ref = dict(volume.get("secret") or volume["configMap"])
                ref.setdefault("name", ref.get("secretName"))
                host.mkdir(parents=True, exist_ok=True)
                for key, value in (self._data(kind, record.namespace, ref) or {}).items():
                    (host / key).write_text(value)
            elif "projected" in volume:  # the ServiceAccount token volume admission adds, for one
                host = record.dir / "volumes" / volume["name"]
                host.mkdir(parents=True, exist_ok=True)
                for source in volume["projected"]["sources"]:
                    self._project(source, pod, host)
            else:
                raise _ConfigError(f"the harness does not emulate the volume {volume}")
            host = host / mount["subPath"] if mount.get("subPath") else host
            host.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"].rstrip("/") or "/"] = host
        return mounts

    def _project(self, source: dict, pod: dict, host: Path) -> None:
        namespace = pod["metadata"]["namespace"]
        if "serviceAccountToken" in source:
            token = self.kube.request_token(pod["spec"].get("serviceAccountName", "default"), namespace,
                                    source["serviceAccountToken"].get("expirationSeconds", 3600))
            (host / source["serviceAccountToken"]["path"]).write_text(token)
        elif "downwardAPI" in source:
            for item in source["downwardAPI"]["items"]:
                (host / item["path"]).write_text(self._value_from(item, pod) or "")
        else:
            kind = "secrets" if "secret" in source else "configmaps"
            ref = source.get("secret") or source["configMap"]
            # kube-root-ca.crt (and the fork's openshift-service-ca.crt) have no publisher here
            data = self._data(kind, namespace, {**ref, "optional": True}) or {}
            for item in ref.get("items") or [{"key": key, "path": key} for key in data]:
                if item["key"] in data:
                    (host / item["path"]).write_text(data[item["key"]])

    def _data(self, kind: str, namespace: str, ref: dict) -> dict[str, str] | None:
        """The decoded data of a Secret or ConfigMap; None if it is absent and optional."""
        obj = self.kube.get(kind, namespace, ref["name"])
        if obj is None:
            if ref.get("optional"):
                return None
            raise _ConfigError(f'{kind[:-1]} "{ref["name"]}" not found')
        data = obj.get("data") or {}
        return {k: base64.b64decode(v).decode() for k, v in data.items()} if kind == "secrets" else data

    def _value_from(self, source: dict, pod: dict) -> str | None:
        meta = pod["metadata"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if m := re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path):
                return (meta.get(m[1]) or {}).get(m[2], "")
            fields = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
                      "metadata.uid": meta["uid"], "spec.nodeName": pod["spec"].get("nodeName", ""),
                      "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
                      "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}
            if path not in fields:
                raise _ConfigError(f"fieldRef {path!r} is not emulated")
            return fields[path]
        for key, kind in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if key in source:
                ref = source[key]
                data = self._data(kind, meta["namespace"], ref)
                if data is not None and ref["key"] in data:
                    return data[ref["key"]]
                if ref.get("optional"):
                    return None
                raise _ConfigError(f"couldn't find key {ref['key']} in {kind[:-1]} "
                                   f"{meta['namespace']}/{ref['name']}")
        raise _ConfigError(f"valueFrom {source} is not emulated")

    def _kill_group(self, record: _PodRecord, sig: int = signal.SIGKILL) -> None:
        if record.proc is None:
            return
        try:
            os.killpg(record.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # -- status ---------------------------------------------------------------------------------

    def _report_exit(self, record: _PodRecord) -> None:
        returncode = record.proc.returncode if record.proc is not None else 128
        code, reason = record.forced or (
            returncode if returncode >= 0 else 128 - returncode, "Completed" if returncode == 0 else "Error")
        message = record.termination_log.read_bytes()[:4096].decode(errors="replace") \
            if record.termination_log.exists() else ""
        if not message and code != 0 and record.message_policy == "FallbackToLogsOnError":
            lines = record.log_path.read_text(errors="replace").splitlines()[-80:] if record.log_path.exists() else []
            message = "\n".join(lines)[-2048:]
        terminated = {"exitCode": code, "reason": reason, "startedAt": record.started_at or _now(),
                      "finishedAt": _now(), "containerID": record.container_id}
        if message:
            terminated["message"] = message
        not_ready = ("False", "PodCompleted", None)
        self._write_status(record, "Succeeded" if code == 0 else "Failed", {"terminated": terminated},
                           {"Ready": not_ready, "ContainersReady": not_ready})
        record.done = True

    def _write_status(self, record: _PodRecord, phase: str, state: dict, conditions: dict,
                      ready: bool = False) -> None:
        def change(status: dict) -> dict:
            return {**status, "phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1",
                    "podIPs": [{"ip": "127.0.0.1"}], "startTime": status.get("startTime") or _now(),
                    "conditions": _merge_conditions(status.get("conditions"), conditions),
                    "containerStatuses": [{
                        "name": record.container, "image": record.image, "imageID": "",
                        "containerID": record.container_id, "ready": ready, "started": "running" in state,
                        "restartCount": 0, "state": state, "lastState": {}}]}
        self._patch_status(record, change)

    def _patch_status(self, record: _PodRecord, change: Callable[[dict], dict]) -> None:
        """Read, change, write with the resourceVersion as precondition; retry on conflicts."""
        if record.node in self._lost:
            return  # nobody is left to report
        for _ in range(20):
            pod = self.kube.get("pods", record.namespace, record.name)
            if pod is None or pod["metadata"]["uid"] != record.uid:
                return
            patch = {"metadata": {"resourceVersion": pod["metadata"]["resourceVersion"]},
                     "status": change(pod.get("status") or {})}
            try:
                self.kube.patch("pods", record.namespace, record.name, patch, subresource="status")
                return
            except ApiError as e:
                if e.status != 409:
                    raise


class _LogServer:
    """The kubelet's HTTPS endpoint for the API server's `pods/log` proxy: /containerLogs/NS/POD/CONTAINER."""

    def __init__(self, kubelet: Kubelet, plane: ControlPlane):
        kubelet_ref = kubelet

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if len(parts) != 4 or parts[0] != "containerLogs":
                    self.send_error(404)
                    return
                try:
                    text = kubelet_ref.logs(parts[2], parts[1])
                except KeyError:
                    self.send_error(404, "no such container")
                    return
                tail = urllib.parse.parse_qs(url.query).get("tailLines")
                if tail:
                    text = "".join(text.splitlines(keepends=True)[-int(tail[0]):])
                body = text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(plane.kubelet_cert, plane.kubelet_key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kubelet-logs", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()



# ---------------------------------------------------------------------------------------------
# The operator, as a separate process

class OperatorProcess:
    """The operator as a subprocess with KUBECONFIG carrying the token of a ServiceAccount bound to
    deploy/operator.yaml's ClusterRole (`token=` another identity's), so it has exactly the RBAC
    that ships.

    `command` defaults to `python -m kontinue operator --standalone --namespace NS`; set it (or
    pass command= to start) to run anything else, e.g. `python -m kopf run ... script.py`."""

    def __init__(self, kube: KubeCluster, workdir: Path, command: list[str] | None = None,
                 token: str | None = None):
        self.kube, self.workdir = kube, Path(workdir)
        self.command = command or [sys.executable, "-m", "kontinue", "operator", "--standalone",
                                   "--namespace", kube.namespace]
        self.proc: subprocess.Popen | None = None
        self._logs: list[Path] = []
        self._last: tuple = ((), None, None)
        token = token or kube.service_account_token("kontinue-operator", OPERATOR_ROLE)
        self._kubeconfig = kube.kubeconfig(self.workdir / "kubeconfig", token=token, user="operator")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *extra_args: str, env: dict[str, str] | None = None,
              command: list[str] | None = None) -> OperatorProcess:
        if self.running:
            raise RuntimeError("the operator is already running")
        self._last = (extra_args, env, command)
        full_env = {key: value for key, value in os.environ.items()
                    if not key.startswith("KUBERNETES_")}  # never the real cluster (in-cluster config)
        full_env.update(KUBECONFIG=str(self._kubeconfig), PYTHONUNBUFFERED="1",
                        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        full_env.update(env or {})
        log_path = self.workdir / f"operator-{len(self._logs) + 1}.log"
        self._logs.append(log_path)
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([*(command or self.command), *extra_args], cwd=REPO, env=full_env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        if self.dump not in self.kube.dumpers:
            self.kube.dumpers.append(self.dump)
        return self

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait for a graceful exit (SIGKILL after timeout); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> int | None:
        """SIGKILL: no cleanup at all, as when a node dies under the operator."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return None if self.proc is None else self.proc.returncode

    def restart(self) -> OperatorProcess:
        self.stop()
        extra_args, env, command = self._last
        return self.start(*extra_args, env=env, command=command)

    def logs(self) -> str:
        """Everything every run of the operator printed, in order."""
        return "".join(path.read_text(errors="replace") for path in self._logs if path.exists())

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        return wait_for(lambda: re.search(pattern, self.logs()), timeout, f"operator log /{pattern}/",
                        dump=self.dump)

    def dump(self) -> str:
        state = "running" if self.running else f"exited {self.proc and self.proc.returncode}"
        return f"--- operator ({state}), log tail:\n{self.logs()[-3000:]}"


# ---------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """The control plane, once per session, with the CRDs from crds/ and the operator's ClusterRole."""
    binaries = assets()
    if binaries is None:
        pytest.skip(f"no Kubernetes control plane for this test: {HOW_TO_GET_THEM}")
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), binaries).start()
    try:
        admin = Client(plane)
        for path in sorted((REPO / "crds").glob("*.yaml")):
            admin.apply_all(yaml.safe_load_all(path.read_text()))
        for path in sorted((REPO / "crds").glob("*.yaml")):
            for crd in yaml.safe_load_all(path.read_text()):
                wait_for(lambda name=crd["metadata"]["name"]: any(
                    c["type"] == "Established" and c["status"] == "True" for c in
                    (admin.get("customresourcedefinitions", None, name).get("status") or {}).get("conditions", [])),
                    30, f"CRD {crd['metadata']['name']} to be established", dump=plane.dump)
        admin.apply_all(d for d in yaml.safe_load_all((REPO / "deploy" / "operator.yaml").read_text())
                        if d and d["kind"] == "ClusterRole")
        yield plane
    finally:
        plane.stop()


@pytest.fixture
def kube(control_plane, request):
    cluster = KubeCluster(control_plane, request.node.name).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def kubelet(kube, tmp_path, tmp_path_factory):
    node = Kubelet(kube, tmp_path / "kubelet", shared_paths=[tmp_path_factory.getbasetemp()]).start()
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def operator_process(kube, tmp_path):
    controller = OperatorProcess(kube, tmp_path / "operator")
    try:
        yield controller
    finally:
        controller.stop(timeout=10)


@pytest.fixture
def priority_classes(kube):
    """Two PriorityClasses (cluster-scoped, so named after the test's namespace)."""
    names = {}
    for level, value in (("low", 10), ("high", 1000)):
        names[level] = f"{kube.namespace}-{level}"
        kube.create({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                     "metadata": {"name": names[level]}, "value": value})
    yield names
    for name in names.values():
        kube.delete("priorityclasses", None, name)
