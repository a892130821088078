"""Kubernetes test harness: an API server, a kubelet that runs pods as local processes, and the
operator as a separate process talking to both over HTTP.

Registered from tests/conftest.py with ``pytest_plugins = [..., "tests.kube_fixtures"]``.

Fixtures:

* ``kube`` -> :class:`KubeCluster`: kmock's ``KubernetesEmulator`` on 127.0.0.1 in a background
  thread, extended into a small API server (see :class:`ApiServer`), with the CRDs from crds/
  installed and the namespaces ``default`` and ``tests`` created.
* ``kubelet`` -> :class:`Kubelet`: runs the pods labelled ``kontinue.dev/run`` as local processes
  and reports their status like a kubelet; preempts, kills, OOM-kills and loses them on request.
* ``operator_process`` -> :class:`OperatorProcess`: ``python -m kontinue operator --standalone
  --namespace tests`` (or any command) as a subprocess with ``KUBECONFIG`` at the emulator.

What the emulator does NOT do (the operator has to live with it; a real cluster does these):

* No schema validation, defaulting or pruning of custom resources (unknown fields are kept;
  a real API server drops fields the CRD schema does not declare).
* Strategic merge patch only merges the lists a pod needs by key (containers, env, conditions,
  ...); ``$patch`` directives are not supported; server-side apply is refused (415).
* No admission, RBAC, quotas, namespace lifecycle (objects may go into any namespace), no
  ``deletecollection``, no eviction subresource, no Foreground cascading (``Orphan`` is honoured,
  everything else cascades in the background), watches send no BOOKMARKs and never answer
  410 Gone, ``limit``/``continue`` are ignored, deleting a CRD does not unserve its resource.
* Binding a pod (the kubelet sets ``spec.nodeName``) counts as a spec change (generation 2).
* The kubelet restarts nothing: every pod behaves as ``restartPolicy: Never``. Only
  ``containers[0]`` runs (no init or sidecar containers). Container ``resources``, probes,
  securityContext and readOnlyRootFilesystem are not enforced; paths outside the mounts are
  the host's. There is one node, ``kind-worker``.
* kmock keeps every request in memory (``list(kube.api)``), the kubelet's polls too.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import json
import logging
import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import pytest
import requests
import yaml
from kmock._internal import parsing as _kmock_parsing

REPO = Path(__file__).resolve().parents[1]
RUN_LABEL = "kontinue.dev/run"
TERMINAL = ("Succeeded", "Failed")
logger = logging.getLogger(__name__)


def _now(offset: float = 0.0) -> str:
    """RFC 3339 in UTC with seconds, as the API server writes timestamps."""
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# kmock 0.8 reads "namespaces" in /api/v1/namespaces[/NAME[/status]] as the namespace prefix of a
# namespaced path and fails to parse it; route those paths to the Namespace resource instead.
_kmock_parse_path = _kmock_parsing.parse_path


def _parse_path(path: str) -> _kmock_parsing.ParsedPath:
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and (
            len(parts) in (3, 4) or (len(parts) == 5 and parts[4] in ("status", "finalize"))):
        return _kmock_parsing.ParsedPath("", "v1", "namespaces", None, *(parts[3:] + [None, None])[:2])
    return _kmock_parse_path(path)


_kmock_parsing.parse_path = _parse_path


# ---------------------------------------------------------------------------------------------
# Selectors (label and field), as the API server applies them to list and watch.

_LABEL_REQUIREMENT = re.compile(
    r"\s*(?P<neg>!)?\s*(?P<key>[\w./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)|\s(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?\s*")


def _label_matcher(selector: str) -> Callable[[dict], bool]:
    """`a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x,y)`, comma-joined (AND)."""
    checks = []
    for part in re.split(r",(?![^()]*\))", selector or ""):
        if not part.strip():
            continue
        m = _LABEL_REQUIREMENT.fullmatch(part)
        if m is None:
            raise kmock.KubernetesError(400, "BadRequest", f"unable to parse requirement: {part!r}")
        key, op, value, values = m["key"], m["op"], m["value"], m["values"]
        if m["neg"]:
            checks.append(lambda labels, k=key: k not in labels)
        elif op in ("=", "=="):
            checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif op == "!=":
            checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif m["set"]:
            allowed = {v.strip() for v in values.split(",")}
            inside = m["set"] == "in"
            checks.append(lambda labels, k=key, a=allowed, i=inside: (labels.get(k) in a) == i)
        else:
            checks.append(lambda labels, k=key: k in labels)
    return lambda body: all(check(body.get("metadata", {}).get("labels") or {}) for check in checks)


def _field_matcher(selector: str) -> Callable[[dict], bool]:
    """`path=value`, `path==value`, `path!=value` on any dotted path (e.g. involvedObject.name)."""
    checks = []
    for part in filter(None, (p.strip() for p in (selector or "").split(","))):
        m = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", part)
        if m is None:
            raise kmock.KubernetesError(400, "BadRequest", f"invalid field selector: {part!r}")
        checks.append((m[1].split("."), m[2] != "!=", m[3]))

    def value_at(body: Any, path: list[str]) -> str:
        for key in path:
            body = body.get(key) if isinstance(body, dict) else None
        return "" if body is None else str(body)

    return lambda body: all((value_at(body, path) == value) == equal for path, equal, value in checks)


# ---------------------------------------------------------------------------------------------
# Patches

def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


# Strategic merge: the lists (by field name) that Kubernetes merges by a key instead of replacing.
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
               "volumeMounts": "mountPath", "conditions": "type", "containerStatuses": "name",
               "ownerReferences": "uid", "ports": "containerPort"}


def _strategic_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return _merge_patch(target, patch)
    result = dict(target)
    for key, value in patch.items():
        merge_key = _MERGE_KEYS.get(key)
        if value is None:
            result.pop(key, None)
        elif merge_key and isinstance(value, list) and isinstance(result.get(key), list):
            merged = {item.get(merge_key): item for item in result[key]}
            for item in value:
                old = merged.get(item.get(merge_key), {})
                merged[item.get(merge_key)] = _strategic_merge_patch(old, item)
            result[key] = list(merged.values())
        else:
            result[key] = _strategic_merge_patch(result.get(key), value)
    return result


# ---------------------------------------------------------------------------------------------
# The API server

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
BUILTIN_RESOURCES = {  # path: (kind, namespaced, subresources)
    "v1/namespaces": ("Namespace", False, ("status",)),
    "v1/pods": ("Pod", True, ("status", "log")),
    "v1/events": ("Event", True, ()),
    "v1/secrets": ("Secret", True, ()),
    "v1/configmaps": ("ConfigMap", True, ()),
    "coordination.k8s.io/v1/leases": ("Lease", True, ()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, ("status",)),
    "kopf.dev/v1/clusterkopfpeerings": ("ClusterKopfPeering", False, ()),
    "kopf.dev/v1/kopfpeerings": ("KopfPeering", True, ()),
}
PODS = kmock.resource("v1/pods")
CRDS = kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions")
SECRETS = kmock.resource("v1/secrets")


def _conflict(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(409, "Conflict", message)


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the API server's bookkeeping added.

    kmock keeps the objects and routes requests; all writes (create, patch, update, delete) are
    reimplemented here so that every object gets uid, creationTimestamp, generation (+1 on spec
    changes), resourceVersion (one global counter, bumped on every write) and its namespace from
    the URL; `/status` is a real subresource (status changes elsewhere are ignored and vice versa);
    merge, JSON (with `test` ops -> 422) and strategic merge patches; resourceVersion preconditions
    (409); finalizers and graceful pod deletion (deletionTimestamp first, removal later); owner
    garbage collection; label and field selectors; watches resumable from a resourceVersion.
    """

    log_source: Callable[[str, str], str | None] | None = None  # serves GET pods/NAME/log
    _rv: int = attrs.field(default=0, init=False)
    _journal: list = attrs.field(factory=list, init=False)  # (rv, resource, event) of every write
    _custom: set = attrs.field(factory=set, init=False)  # resources served from CRDs
    _tasks: set = attrs.field(factory=set, init=False)

    def declare(self, path: str, kind: str, *, namespaced: bool, subresources: Iterable[str] = (),
                singular: str | None = None, shortnames: Iterable[str] = (),
                categories: Iterable[str] = ()) -> None:
        self.resources[path] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, singular=singular or kind.lower(), verbs=ALL_VERBS,
            shortnames=shortnames, categories=categories, subresources=subresources)

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo:
        return self.resources[resource]

    # -- request routing ------------------------------------------------------------------------

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        resource = request.resource
        if resource is None or resource.plural is None:  # discovery, /version, non-Kubernetes
            return await super()._handle(request)
        if resource not in self.resources:
            raise kmock.KubernetesResourceNotFoundError()
        if request.action in (kmock.action.LIST, kmock.action.WATCH, kmock.action.FETCH):
            return await super()._handle(request)
        if request.action == kmock.action.CREATE:
            write = self._create
        elif request.action == kmock.action.UPDATE or (request.method == "PUT" and request.name):
            write = self._update
        elif request.action == kmock.action.DELETE:
            write = self._delete
        else:
            raise kmock.KubernetesError(405, "MethodNotAllowed",
                                        f"{request.method} {request.url.path} is not emulated")
        async with self._lock:
            status, body = await write(request)
        return aiohttp.web.json_response(body, status=status)

    # -- writes ---------------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def _emit(self, resource: kmock.resource, kind: str, body: dict) -> None:
        event = {"type": kind, "object": body}
        self._journal.append((int(body["metadata"]["resourceVersion"]), resource, event))
        await self._buses[resource].put(event)

    def _stored(self, resource: kmock.resource, namespace: str | None, name: str) -> dict:
        key = (resource, namespace if self._info(resource).namespaced else None, name)
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesError(404, "NotFound", f'{resource.plural} "{name}" not found')
        return copy.deepcopy(self.objects[key].raw)

    async def _create(self, request: kmock.Request) -> tuple[int, dict]:
        resource, info = request.resource, self._info(request.resource)
        if not isinstance(request.data, dict):
            raise kmock.KubernetesError(400, "BadRequest", "the body must be a JSON object")
        body = copy.deepcopy(request.data)
        meta = body.setdefault("metadata", {})
        if info.namespaced:
            if request.namespace and meta.get("namespace") not in (None, request.namespace):
                raise kmock.KubernetesError(400, "BadRequest", "the namespace of the object does "
                                            "not match the namespace on the request")
            meta["namespace"] = request.namespace or meta.get("namespace")
            if not meta["namespace"]:
                raise kmock.KubernetesError(400, "BadRequest", "a namespace is required")
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(
                random.choices(string.ascii_lowercase + string.digits, k=5))
        if not meta.get("name"):
            raise kmock.KubernetesError(422, "Invalid", "metadata.name: Required value")
        key = (resource, meta.get("namespace"), meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            raise kmock.KubernetesError(409, "AlreadyExists",
                                        f'{resource.plural} "{meta["name"]}" already exists')
        group_version = f"{resource.group}/{resource.version}".lstrip("/")
        body.setdefault("apiVersion", group_version)
        body.setdefault("kind", info.kind)
        for system_field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(system_field, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), generation=1,
                    resourceVersion=self._next_rv())
        if "status" in info.subresources:  # the status of a new object is the server's to set
            body.pop("status", None)
        if resource == PODS:
            self._default_pod(body)
        elif resource == SECRETS:
            self._normalise_secret(body)
        elif resource == CRDS:
            self._serve_crd(body)
        elif resource == kmock.resource("v1/namespaces"):
            body["status"] = {"phase": "Active"}
        if key in self.objects:
            self.objects[key].create(body)
        else:
            self.objects[key] = body
        await self._emit(resource, "ADDED", body)
        return 201, body

    async def _update(self, request: kmock.Request) -> tuple[int, dict]:
        resource, info = request.resource, self._info(request.resource)
        old = self._stored(resource, request.namespace, request.name)
        subresource = request.subresource
        if subresource not in (None, "status") or (subresource and subresource not in info.subresources):
            raise kmock.KubernetesError(404, "NotFound", f"no subresource {subresource!r}")
        content_type = next((value for key, value in request.headers.items()
                             if key.lower() == "content-type"), "").split(";")[0].strip()
        precondition = None
        if request.method != "PATCH" or content_type != "application/json-patch+json":
            if not isinstance(request.data, dict):
                raise kmock.KubernetesError(400, "BadRequest", "the body must be a JSON object")
        if request.method == "PUT":
            new = copy.deepcopy(request.data)
            precondition = (new.get("metadata") or {}).get("resourceVersion")
        elif content_type == "application/json-patch+json":
            try:
                new = jsonpatch.apply_patch(old, request.data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise kmock.KubernetesError(422, "Invalid", f"the patch cannot be applied: {e}")
        elif content_type == "application/merge-patch+json" or (
                content_type == "application/strategic-merge-patch+json" and resource not in self._custom):
            precondition = (request.data.get("metadata") or {}).get("resourceVersion")
            merge = _merge_patch if content_type == "application/merge-patch+json" else _strategic_merge_patch
            new = merge(old, request.data)
        else:
            raise kmock.KubernetesError(415, "UnsupportedMediaType",
                                        f"the patch type {content_type!r} is not supported here")
        if precondition is not None and precondition != old["metadata"]["resourceVersion"]:
            raise _conflict(f'Operation cannot be fulfilled on {resource.plural} "{request.name}": '
                            "the object has been modified; please apply your changes to the "
                            "latest version and try again")
        # What a client cannot change, and the isolation of the status subresource:
        meta, old_meta = new.setdefault("metadata", {}), old["metadata"]
        for fixed in ("uid", "name", "namespace", "creationTimestamp", "generation",
                      "deletionTimestamp", "deletionGracePeriodSeconds"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        if subresource == "status":  # only the status changes, whatever else the client sent
            status, new = new.get("status"), copy.deepcopy(old)
            new.pop("status", None)
            if status is not None:
                new["status"] = status
        elif "status" in info.subresources:  # and the status does not change here
            new.pop("status", None)
            if "status" in old:
                new["status"] = old["status"]
        meta = new["metadata"]
        if old_meta.get("deletionTimestamp") and set(meta.get("finalizers") or []) - set(
                old_meta.get("finalizers") or []):
            raise kmock.KubernetesError(422, "Forbidden", "no new finalizers can be added if "
                                        "the object is being deleted")
        if resource == SECRETS:
            self._normalise_secret(new)
        meta["resourceVersion"] = old_meta["resourceVersion"]
        if new == old:  # a no-op write: no new resourceVersion, no watch event
            return 200, old
        if subresource is None and new.get("spec") != old.get("spec"):
            meta["generation"] = old_meta.get("generation", 1) + 1
        meta["resourceVersion"] = self._next_rv()
        key = (resource, meta.get("namespace"), meta["name"])
        self.objects[key].history.append(new)
        await self._emit(resource, "MODIFIED", new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not meta.get(
                "deletionGracePeriodSeconds"):  # released (a pod in its grace period stays)
            await self._remove(resource, key)
        return 200, new

    async def _delete(self, request: kmock.Request) -> tuple[int, dict]:
        options = request.data if isinstance(request.data, dict) else {}
        grace = options.get("gracePeriodSeconds", request.params.get("gracePeriodSeconds"))
        propagation = options.get("propagationPolicy", request.params.get("propagationPolicy"))
        old = self._stored(request.resource, request.namespace, request.name)
        for field_name, wanted in (options.get("preconditions") or {}).items():
            if wanted is not None and old["metadata"].get(field_name) != wanted:
                raise _conflict(f"Precondition failed: {field_name} is {old['metadata'].get(field_name)}")
        return 200, await self._delete_object(request.resource, old, None if grace is None else int(grace),
                                              orphan=propagation == "Orphan")

    async def _delete_object(self, resource: kmock.resource, old: dict, grace: int | None,
                             orphan: bool = False) -> dict:
        meta = old["metadata"]
        key = (resource, meta.get("namespace"), meta["name"])
        # A pod on a node is deleted gracefully: it is marked, the kubelet stops its containers
        # and then deletes it for good with grace 0. Unscheduled and finished pods go at once.
        graceful = (resource == PODS and old["spec"].get("nodeName") and grace != 0
                    and (old.get("status") or {}).get("phase") not in TERMINAL)
        grace = (old["spec"].get("terminationGracePeriodSeconds", 30) if grace is None else grace) if graceful else 0
        if not graceful and not meta.get("finalizers"):
            return await self._remove(resource, key, orphan=orphan)
        if meta.get("deletionTimestamp") and grace >= meta.get("deletionGracePeriodSeconds", 0):
            return old  # marked already; a deletion may only shorten the grace period
        new = copy.deepcopy(old)
        new["metadata"].update(deletionTimestamp=_now(grace), deletionGracePeriodSeconds=grace,
                               resourceVersion=self._next_rv())
        self.objects[key].history.append(new)
        await self._emit(resource, "MODIFIED", new)
        return new

    async def _remove(self, resource: kmock.resource, key: tuple, orphan: bool = False) -> dict:
        body = copy.deepcopy(self.objects[key].raw)
        body["metadata"]["resourceVersion"] = self._next_rv()
        self.objects[key].delete()
        await self._emit(resource, "DELETED", body)
        if not orphan:  # the garbage collector runs in the background, as in kube-controller-manager
            task = asyncio.get_running_loop().create_task(self._collect_garbage(body["metadata"]["uid"]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return body

    async def _collect_garbage(self, owner_uid: str) -> None:
        async with self._lock:
            alive = {obj.raw["metadata"].get("uid") for obj in self.objects.values() if not obj.deleted}
            for (resource, _, _), obj in list(self.objects.items()):
                if obj.deleted:
                    continue
                body = copy.deepcopy(obj.raw)
                refs = body["metadata"].get("ownerReferences") or []
                if not any(ref.get("uid") == owner_uid for ref in refs):
                    continue
                if any(ref.get("uid") in alive for ref in refs):  # another owner lives: just unlink
                    body["metadata"]["ownerReferences"] = [r for r in refs if r.get("uid") != owner_uid]
                    body["metadata"]["resourceVersion"] = self._next_rv()
                    obj.history.append(body)
                    await self._emit(resource, "MODIFIED", body)
                else:
                    await self._delete_object(resource, body, grace=None)

    def _default_pod(self, body: dict) -> None:
        spec = body.setdefault("spec", {})
        spec.setdefault("restartPolicy", "Always")
        spec.setdefault("terminationGracePeriodSeconds", 30)
        for container in spec.get("containers") or []:
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
        body["status"] = {"phase": "Pending"}

    @staticmethod
    def _normalise_secret(body: dict) -> None:
        """The API server stores stringData base64-encoded into data and never returns it."""
        for key, value in (body.pop("stringData", None) or {}).items():
            body.setdefault("data", {})[key] = base64.b64encode(value.encode()).decode()

    def _serve_crd(self, crd: dict) -> None:
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if version.get("served", True):
                path = f"{spec['group']}/{version['name']}/{names['plural']}"
                self.declare(path, names["kind"], namespaced=spec.get("scope") == "Namespaced",
                             subresources=(version.get("subresources") or {}).keys(),
                             singular=names.get("singular"), shortnames=names.get("shortNames", ()),
                             categories=names.get("categories", ()))
                self._custom.add(kmock.resource(path))
        crd["status"] = {"acceptedNames": names, "storedVersions": [
            v["name"] for v in spec["versions"] if v.get("storage")], "conditions": [
            {"type": t, "status": "True", "lastTransitionTime": _now()} for t in ("NamesAccepted", "Established")]}

    # -- reads ----------------------------------------------------------------------------------

    def _matcher(self, request: kmock.Request) -> Callable[[dict], bool]:
        labels = _label_matcher(request.params.get("labelSelector", ""))
        fields = _field_matcher(request.params.get("fieldSelector", ""))
        namespace, name = request.namespace, request.name
        return lambda body: (
            (namespace is None or body["metadata"].get("namespace") == namespace)
            and (name is None or body["metadata"]["name"] == name)
            and labels(body) and fields(body))

    def _select(self, resource: kmock.resource, matches: Callable[[dict], bool]) -> list[dict]:
        bodies = [obj.raw for (res, _, _), obj in self.objects.items()
                  if res == resource and not obj.deleted and matches(obj.raw)]
        return sorted(bodies, key=lambda b: (b["metadata"].get("namespace") or "", b["metadata"]["name"]))

    async def _serve_list(self, request: kmock.Request) -> dict:
        matches = self._matcher(request)
        async with self._lock:
            items = self._select(request.resource, matches)
            version = str(self._rv)
        resource = request.resource
        return {"apiVersion": f"{resource.group}/{resource.version}".lstrip("/"),
                "kind": f"{self._info(resource).kind}List",
                "metadata": {"resourceVersion": version}, "items": items}

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        async with self._lock:
            body = self._stored(request.resource, request.namespace, request.name)
        if request.subresource == "log" and request.resource == PODS:
            text = self.log_source(request.namespace, request.name) if self.log_source else None
            if text is None:
                raise kmock.KubernetesError(400, "BadRequest", f'container of pod "{request.name}" '
                                            "has not started")
            if request.params.get("tailLines"):
                text = "".join(text.splitlines(keepends=True)[-int(request.params["tailLines"]):])
            return kmock.Response(payload=text.encode(), headers={"Content-Type": "text/plain"})
        if request.subresource not in (None, "status"):
            raise kmock.KubernetesError(404, "NotFound", f"no subresource {request.subresource!r}")
        return body

    async def _serve_watch(self, request: kmock.Request):
        yield b""  # send the headers now: the stream is open even if nothing happens
        matches = self._matcher(request)
        since = request.params.get("resourceVersion") or "0"
        timeout = request.params.get("timeoutSeconds")
        bus = self._buses[request.resource]
        async with self._lock:  # no write can slip between the backlog and the live stream
            mark = await bus.mark()
            if since == "0" or not since.isdigit():
                backlog = [{"type": "ADDED", "object": body}
                           for body in self._select(request.resource, matches)]
            else:
                backlog = [event for rv, resource, event in self._journal
                           if rv > int(since) and resource == request.resource and matches(event["object"])]
        stream = bus.stream(since=mark)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + float(timeout)
        try:
            for event in backlog:
                yield event
            while True:
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    event = await asyncio.wait_for(anext(stream), remaining)
                except TimeoutError:
                    return
                if matches(event["object"]):
                    yield event
        finally:
            await stream.aclose()
            await bus.unmark(mark)


# ---------------------------------------------------------------------------------------------
# The cluster as the tests see it: a server thread plus a small HTTP client.

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


class KubeCluster:
    """The emulated API server, in a background thread with its own event loop, and a client."""

    def __init__(self, namespace: str = "tests"):
        self.namespace = namespace
        self.url = ""
        self.api: ApiServer | None = None
        self.dumpers: list[Callable[[], str]] = []  # more state for wait_for's timeout message
        self._local = threading.local()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop = None
        self._stopping = None
        self._error: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> KubeCluster:
        self._thread = threading.Thread(target=self._serve_forever, name="kube-api", daemon=True)
        self._thread.start()
        if not self._ready.wait(15) or self._error:
            raise RuntimeError(f"the API server did not start: {self._error!r}")
        for path in sorted((REPO / "crds").glob("*.yaml")):
            for crd in yaml.safe_load_all(path.read_text()):
                self.create(crd)
        for name in ("default", self.namespace):
            self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        return self

    def _serve_forever(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            self.api = ApiServer()
            for path, (kind, namespaced, subresources) in BUILTIN_RESOURCES.items():
                self.api.declare(path, kind, namespaced=namespaced, subresources=subresources)
            async with self.api, kmock.Server(self.api, host="127.0.0.1") as server:
                self.url = str(server.url).rstrip("/")
                self._ready.set()
                await self._stopping.wait()

        try:
            asyncio.run(serve())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(15)

    def kubeconfig(self, path: str | os.PathLike) -> Path:
        """Write a kubeconfig pointing at the emulator (for `KUBECONFIG=...`)."""
        path = Path(path)
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "emulator", "context": {
                "cluster": "emulator", "user": "tester", "namespace": self.namespace}}],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    def api_client(self):
        """A `kubernetes.client.ApiClient` for the typed API classes (CoreV1Api(kube.api_client()))."""
        import kubernetes

        configuration = kubernetes.client.Configuration()
        configuration.host = self.url
        return kubernetes.client.ApiClient(configuration)

    # -- HTTP client ----------------------------------------------------------------------------

    def _resource(self, ref: str) -> tuple[kmock.resource, kmock.ResourceInfo]:
        """By plural (`pods`), kind (`Pod`) or path (`v1/pods`, `kontinue.dev/v1alpha1/trainingruns`)."""
        for resource in list(self.api.resources):
            info = self.api.resources[resource]
            path = f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/")
            if ref in (resource.plural, info.kind, path):
                return resource, info
        raise KeyError(f"unknown resource {ref!r}")

    def _path(self, ref: str, namespace: str | None = None, name: str | None = None,
              subresource: str | None = None) -> str:
        resource, info = self._resource(ref)
        path = f"/api/{resource.version}" if not resource.group else f"/apis/{resource.group}/{resource.version}"
        if info.namespaced and namespace:
            path += f"/namespaces/{namespace}"
        path += f"/{resource.plural}"
        return path + "".join(f"/{part}" for part in (name, subresource) if part)

    def request(self, method: str, path: str, *, body: Any = None, params: dict | None = None,
                content_type: str = "application/json", missing_ok: bool = False) -> Any:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        response = session.request(
            method, self.url + path, params=params, timeout=30,
            data=None if body is None else json.dumps(body), headers={"Content-Type": content_type})
        if response.status_code == 404 and missing_ok:
            return None
        try:
            payload = response.json()
        except ValueError:
            payload = response.text
        if response.status_code >= 400:
            raise ApiError(response.status_code, payload)
        return payload

    def create(self, obj: dict) -> dict:
        group, _, version = obj["apiVersion"].rpartition("/")
        for resource in list(self.api.resources):
            if (resource.group, resource.version, self.api.resources[resource].kind) == (group, version, obj["kind"]):
                break
        else:
            raise KeyError(f"unknown kind {obj['apiVersion']}/{obj['kind']}")
        namespace = obj.get("metadata", {}).get("namespace") or self.namespace
        path = self._path(f"{group}/{version}/{resource.plural}".lstrip("/"), namespace)
        return self.request("POST", path, body=obj)

    def get(self, resource: str, namespace: str | None, name: str) -> dict | None:
        """The object, or None if there is none."""
        return self.request("GET", self._path(resource, namespace, name), missing_ok=True)

    def list(self, resource: str, namespace: str | None = None, labels: dict | str | None = None,
             fields: str | None = None) -> list[dict]:
        """`labels`: a selector string, or a dict where a None value means "has the label"."""
        if isinstance(labels, dict):
            labels = ",".join(key if value is None else f"{key}={value}" for key, value in labels.items())
        params = {key: value for key, value in (("labelSelector", labels), ("fieldSelector", fields)) if value}
        return self.request("GET", self._path(resource, namespace), params=params)["items"]

    def patch(self, resource: str, namespace: str | None, name: str, patch: Any, *,
              subresource: str | None = None, type: str = "merge") -> dict:
        """`type`: merge (RFC 7386), json (RFC 6902) or strategic."""
        content_type = {"merge": "application/merge-patch+json", "json": "application/json-patch+json",
                        "strategic": "application/strategic-merge-patch+json"}[type]
        return self.request("PATCH", self._path(resource, namespace, name, subresource),
                            body=patch, content_type=content_type)

    def delete(self, resource: str, namespace: str | None, name: str, *, grace: int | None = None,
               propagation: str | None = None, missing_ok: bool = True) -> dict | None:
        options = {key: value for key, value in (("gracePeriodSeconds", grace),
                                                  ("propagationPolicy", propagation)) if value is not None}
        return self.request("DELETE", self._path(resource, namespace, name),
                            body=options or None, missing_ok=missing_ok)

    def events(self, namespace: str | None = None, involved_name: str | None = None) -> list[dict]:
        """Core v1 Events, oldest first; optionally only those about objects with that name."""
        fields = f"involvedObject.name={involved_name}" if involved_name else None
        items = self.list("events", namespace, fields=fields)
        return sorted(items, key=lambda e: int(e["metadata"]["resourceVersion"]))

    def history(self, resource: str, namespace: str | None, name: str) -> list[dict | None]:
        """Every version the object had (None marks a deletion), read from the server's memory:
        for asserting on states that lasted too briefly to catch by polling."""
        res, info = self._resource(resource)
        obj = self.api.objects[res, namespace if info.namespaced else None, name]
        return [None if version is None else copy.deepcopy(version.raw) for version in obj.history]

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
            return f"--- {resource} {namespace}/{name}:\n{yaml.safe_dump(obj)}\n{self.dump(namespace)}"
        return wait_for(check, timeout, what or f"{resource} {namespace}/{name}", dump=dump)

    def dump(self, namespace: str | None = None) -> str:
        """The custom resources and pods (status only), the latest events, and what the kubelet
        and operator fixtures add (log tails)."""
        lines = []
        for resource in ("trainingruns", "transferruns", "pods"):
            for obj in self.list(resource, namespace):
                meta = obj["metadata"]
                shown = obj if resource != "pods" else {
                    "metadata": {k: meta.get(k) for k in ("labels", "deletionTimestamp", "uid")},
                    "status": obj.get("status")}
                lines.append(f"--- {obj['kind']} {meta.get('namespace')}/{meta['name']}:\n"
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
    proc: subprocess.Popen | None = None
    container_id: str = ""
    started_at: str | None = None
    waiting: str | None = None  # why the container is not running yet
    kill_at: float | None = None  # when terminating: SIGKILL after this (monotonic)
    forced: tuple[int, str] | None = None  # (exitCode, reason) to report instead of the real one
    done: bool = False  # the final status was reported

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
    """Runs the pods the selector matches as local processes and reports them like a kubelet.

    `spec.containers[0]`'s command + args run with its env (values, Secret/ConfigMap keys, pod
    fields), its volumes mapped to host directories (emptyDir: a fresh directory per pod;
    persistentVolumeClaim: a directory per claim that outlives pods; hostPath: itself;
    secret/configMap: the keys as files), and the mount paths rewritten in args and env values
    (except under `shared_paths`, host paths every "node" sees, such as pytest's temp root). A
    leading `kontinue` runs `sys.executable -m kontinue`. The termination message file is passed
    as `KONTINUE_TERMINATION_LOG`. Images from a `*.invalid` registry never pull.
    """

    node_name = "kind-worker"

    def __init__(self, kube: KubeCluster, root: Path, *, shared_paths: Iterable[Path] = (),
                 selector: str = RUN_LABEL, interval: float = 0.1):
        self.kube, self.root, self.selector, self.interval = kube, Path(root), selector, interval
        self.shared_paths = [Path(p) for p in shared_paths]
        self.started: list[str] = []  # names of the pods whose process started, in order
        self.errors: list[str] = []  # exceptions of the loop, for the dump
        self._pods: dict[str, _PodRecord] = {}  # by uid: pods the API still has
        self._orphans: list[_PodRecord] = []  # processes of pods deleted for good, being stopped
        self._records: list[_PodRecord] = []  # every pod ever admitted, for logs()
        self._overrides: dict[str, list[str]] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)

    # -- test-facing API ------------------------------------------------------------------------

    def start(self) -> Kubelet:
        self.kube.api.log_source = self._log_source
        self.kube.dumpers.append(self.dump)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with self._lock:
            for record in list(self._pods.values()) + self._orphans:
                self._kill_group(record)
                if record.proc is not None:
                    record.proc.wait(10)

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
        """The host directory behind a PersistentVolumeClaim (one per claim, outliving pods)."""
        return self.root / "claims" / (namespace or self.kube.namespace) / claim

    def override_command(self, run: str, argv: list[str] | None) -> None:
        """Pods of that run (label kontinue.dev/run) started from now on run argv instead of
        their command and args (env and mounts still apply). None restores the pod's own."""
        if argv is None:
            self._overrides.pop(run, None)
        else:
            self._overrides[run] = list(argv)

    def preempt(self, pod_name: str, reason: str = "PreemptionByScheduler", grace: int = 30, *,
                message: str | None = None, namespace: str | None = None, wait: bool = True) -> None:
        """As a scheduler, taint manager or eviction would: DisruptionTarget condition, then
        deletion with the grace period; this kubelet then SIGTERMs the process, SIGKILLs it after
        the grace period, reports its terminated state and removes the pod."""
        record = self._find(pod_name, namespace)
        message = message or f"{reason}: the harness disrupted the pod"
        with self._lock:
            self._patch_status(record, lambda status: {**status, "conditions": _merge_conditions(
                status.get("conditions"), {"DisruptionTarget": ("True", reason, message)})})
            self.kube.delete("pods", record.namespace, pod_name, grace=grace)
        if wait:
            self.kube.wait_for(lambda: (self.kube.get("pods", record.namespace, pod_name) or {}).get(
                "metadata", {}).get("uid") != record.uid, grace + 15, f"preempted pod {pod_name} to go")

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
        """The node is gone: the process dies and the pod object goes, with no final status."""
        with self._lock:
            record = self._find(pod_name, namespace)
            self._pods.pop(record.uid, None)
            self._kill_group(record)
            if record.proc is not None:
                record.proc.wait(10)
            self.kube.delete("pods", record.namespace, pod_name, grace=0)

    def dump(self) -> str:
        with self._lock:
            lines = [f"--- kubelet: running {self.running_pods()}, started {self.started}"]
            lines += [f"  loop error: {error}" for error in self.errors[-3:]]
            for record in self._records[-4:]:
                tail = record.log_path.read_text(errors="replace")[-1500:] if record.log_path.exists() else ""
                lines.append(f"--- log of pod {record.name} (tail):\n{tail}")
        return "\n".join(lines)

    def _find(self, pod_name: str, namespace: str | None, live: bool = True) -> _PodRecord:
        # No lock: the API server thread calls this (pods/NAME/log) while the loop holds the lock.
        records = list(self._pods.values()) if live else list(self._records)
        for record in reversed(records):
            if record.name == pod_name and namespace in (None, record.namespace):
                return record
        raise KeyError(f"the kubelet has no {'running ' if live else ''}pod {pod_name!r}")

    def _log_source(self, namespace: str, name: str) -> str | None:
        try:
            return self.logs(name, namespace)
        except KeyError:
            return None

    # -- the loop -------------------------------------------------------------------------------

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
        for pod in self.kube.list("pods", labels=self.selector):
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            record = self._pods.get(uid)
            if record is None:
                self._admit(pod)
            else:
                self._sync(record, pod)
        for uid in set(self._pods) - seen:  # deleted for good by someone else: stop the process
            record = self._pods.pop(uid)
            if record.alive:
                record.proc.send_signal(signal.SIGTERM)
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
        if meta.get("deletionTimestamp") or pod.get("status", {}).get("phase") in TERMINAL:
            return  # never ran here
        if spec.get("nodeName") not in (None, self.node_name):
            return
        if any(r.name == meta["name"] and r.namespace == meta["namespace"] and r.alive
               for r in list(self._pods.values()) + self._orphans):
            return  # the old process of that name is still stopping: never two at once
        container = spec["containers"][0]
        record = _PodRecord(
            uid=meta["uid"], namespace=meta["namespace"], name=meta["name"], image=container.get("image", ""),
            container=container["name"], dir=self.root / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}",
            grace=spec.get("terminationGracePeriodSeconds", 30),
            message_policy=container.get("terminationMessagePolicy", "File"))
        record.dir.mkdir(parents=True)
        self._pods[record.uid] = record
        self._records.append(record)
        self.kube.patch("pods", record.namespace, record.name, {"spec": {"nodeName": self.node_name}})
        self._write_status(record, "Pending", {"waiting": {"reason": "ContainerCreating"}},
                           {"PodScheduled": ("True", None, None), "Initialized": ("True", None, None),
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
            record.proc.send_signal(signal.SIGTERM)
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
        self.kube.delete("pods", record.namespace, record.name, grace=0)

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
            else:
                raise _ConfigError(f"the harness does not emulate the volume {volume}")
            host = host / mount["subPath"] if mount.get("subPath") else host
            host.mkdir(parents=True, exist_ok=True)
            mounts[mount["mountPath"].rstrip("/") or "/"] = host
        return mounts

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
                      "metadata.uid": meta["uid"], "spec.nodeName": self.node_name,
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
                    "qosClass": "BestEffort",
                    "conditions": _merge_conditions(status.get("conditions"), conditions),
                    "containerStatuses": [{
                        "name": record.container, "image": record.image, "imageID": "",
                        "containerID": record.container_id, "ready": ready, "started": "running" in state,
                        "restartCount": 0, "state": state, "lastState": {}}]}
        self._patch_status(record, change)

    def _patch_status(self, record: _PodRecord, change: Callable[[dict], dict]) -> None:
        """Read, change, write with the resourceVersion as precondition; retry on conflicts."""
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


# ---------------------------------------------------------------------------------------------
# The operator, as a separate process

class OperatorProcess:
    """The operator as a subprocess with KUBECONFIG pointing at the emulator.

    `command` defaults to `python -m kontinue operator --standalone --namespace NS`; set it (or
    pass command= to start) to run anything else, e.g. `python -m kopf run ... script.py`."""

    def __init__(self, kube: KubeCluster, workdir: Path, command: list[str] | None = None):
        self.kube, self.workdir = kube, Path(workdir)
        self.command = command or [sys.executable, "-m", "kontinue", "operator", "--standalone",
                                   "--namespace", kube.namespace]
        self.proc: subprocess.Popen | None = None
        self._logs: list[Path] = []
        self._last: tuple = ((), None, None)
        self._kubeconfig = kube.kubeconfig(self.workdir / "kubeconfig")

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

@pytest.fixture
def kube():
    cluster = KubeCluster().start()
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
