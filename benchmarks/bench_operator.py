"""Operator benchmark: kontinue's operator (`python -m kontinue operator`, its own process) against a
real control plane (etcd, kube-apiserver, kube-controller-manager and kube-scheduler v1.36.2 from
envtest's binaries, as tests/control_plane.py starts them for the tests), on this machine's CPUs.
The operator runs with `--standalone --namespace NS --metrics-port 0 --health-port 0`,
authenticated as a ServiceAccount bound to deploy/operator.yaml's ClusterRole (as in the tests).

1. **Resume latency.** --preemptions runs, their pods bound by the scheduler to one Node and played
   by a scripted kubelet (default: the benchmark writes the status updates and the final deletion
   a kubelet writes, with no process behind them; the harness's Kubelet object only keeps the Node
   alive, its Lease renewed) or by the harness kubelet running a cheap stand-in for the trainer
   that exits 75 on SIGTERM (--kubelet harness). Each run's pod is preempted through the Eviction
   API (default; the API server sets DisruptionTarget and deletes with the pod's grace period) or
   as a kubelet preempts (--preempt-by kubelet: DisruptionTarget, then a delete with 30 s of
   grace); the scripted kubelet then reports the container's exit with the trainer's "preempted"
   code 75 --exit-after seconds later and deletes the pod for good, as a kubelet does. First one
   run at a time ("isolated"), then all runs at once ("burst"). Measured, per preemption, until
   the next attempt's pod object exists: from the operator's status write that counts the
   preemption, from the old pod object being gone (its DELETED), from the terminated container
   status, and from the preemption (the write that sets deletionTimestamp).
2. **Scale.** --runs TrainingRuns created at once. No Node can take their pods (the only Node is
   tainted for the probes; --scale-nodes N adds N untainted Nodes that nobody runs pods on), so
   the scheduler marks each pod Unschedulable and it stays Pending, as in a cluster full of GPU
   jobs. Time until every run has its first pod, until the operator has recorded every pod in its
   run's status, and until kopf has put its finalizer on every run; runs/s; the operator's peak
   RSS (VmHWM from /proc) and CPU time, and the control plane's. Then the steady load the operator
   puts on the API server with that many idle runs, and how quickly it reacts, under that load, to
   --probes new runs (they tolerate the probe Node's taint, so their pods are scheduled, started
   by the scripted kubelet and evicted).

How it times: the benchmark watches pods and trainingruns in the namespace (one thread per
resource) and records time.perf_counter when each event arrives. The operator's requests come from
the API server's audit log (level Metadata, only requests made with a ServiceAccount's token: the
operator is the only such client; the controllers, the scheduler, the harness and the benchmark use
the admin token): verb, resource, name, answer, and the API server's receive and completion times
(wall clock, converted to this process's perf_counter). No polling while measuring: the script
waits on a condition that the watch threads notify.

    python benchmarks/bench_operator.py [--preemptions N] [--runs N] [--kubelet scripted|harness]
        [--preempt-by evict|kubelet] [--scale-nodes N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing; tests/ holds the harness

from tests import control_plane as cp  # noqa: E402
from tests import kube_fixtures as kf  # noqa: E402

OPERATOR_FLAGS = ("--metrics-port", "0", "--health-port", "0")  # + --standalone --namespace NS (the default command)
STAND_IN = [sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, lambda *a: exit(75)); time.sleep(600)"]
PREEMPTED_WORD = json.dumps({"result": "preempted", "step": 42})  # the trainer's termination message on SIGTERM
PROBE_TAINT = {"key": "kontinue.dev/bench-probe", "value": "true", "effect": "NoSchedule"}
NEVER = 1e6  # the harness kubelet's poll interval when it only keeps Nodes alive (the scripted kubelet)


def run_manifest(name: str, namespace: str, tolerate_probe_node: bool = False) -> dict[str, Any]:
    """A minimal valid TrainingRun with its data and run directory on claims (bound to volumes, so
    the scheduler can place the pods; the pods never run the trainer, so the files need not exist)."""
    spec: dict[str, Any] = {
        "task": {"label": "label"}, "data": {"train": "/data/train.parquet"},
        "model": {"hfText": {"checkpoint": "/models/minilm"}},
        "checkpoint": {"storage": "/runs"}, "maxPreemptions": 1000,
        "volumes": [{"name": "runs", "claimName": "runs", "mountPath": "/runs"},
                    {"name": "data", "claimName": "data", "mountPath": "/data", "readOnly": True}]}
    if tolerate_probe_node:
        spec["resources"] = {"tolerations": [{"key": PROBE_TAINT["key"], "operator": "Equal",
                                              "value": PROBE_TAINT["value"], "effect": PROBE_TAINT["effect"]}]}
    return {"apiVersion": "kontinue.dev/v1alpha1", "kind": "TrainingRun",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


# -- the control plane, with an audit log of the operator's requests ----------------------------------
AUDIT_POLICY = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
                "rules": [{"level": "Metadata", "userGroups": ["system:serviceaccounts"]}, {"level": "None"}]}


class BenchPlane(cp.ControlPlane):
    """tests.control_plane.ControlPlane, the API server started with an audit log (Metadata level) of
    the requests made with a ServiceAccount's token: only the operator's."""

    def _spawn(self, name: str, *args: str) -> None:
        if name == "kube-apiserver":
            policy = self.root / "audit-policy.yaml"
            policy.write_text(yaml.safe_dump(AUDIT_POLICY))
            args = (*args, f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_path}",
                    "--audit-log-maxsize=0", "--audit-log-mode=blocking")
        super()._spawn(name, *args)

    @property
    def audit_path(self) -> Path:
        return self.root / "audit.log"


def start_plane(root: Path) -> BenchPlane:
    """The control plane with the CRDs from crds/ and deploy/operator.yaml's ClusterRole (as the
    tests' control_plane fixture installs them)."""
    binaries = cp.assets() or cp.unpack()
    plane = BenchPlane(root, binaries).start()
    try:
        admin = kf.Client(plane)
        documents = [d for path in sorted((REPO / "crds").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
        admin.apply_all(documents)
        for crd in documents:
            kf.wait_for(lambda name=crd["metadata"]["name"]: any(
                c["type"] == "Established" and c["status"] == "True" for c in
                (admin.get("customresourcedefinitions", None, name).get("status") or {}).get("conditions", [])),
                60, f"CRD {crd['metadata']['name']} to be established", dump=plane.dump)
        admin.apply_all(d for d in yaml.safe_load_all((REPO / "deploy" / "operator.yaml").read_text())
                        if d and d["kind"] == "ClusterRole")
    except BaseException:
        plane.stop()
        raise
    return plane


# -- what the API server saw ----------------------------------------------------------------------------
@dataclass
class Request:
    t: float  # received by the API server (this process's perf_counter)
    verb: str
    plural: str | None
    subresource: str | None
    name: str | None
    status: int
    duration: float  # received -> response complete, in the API server


WALL_TO_PERF = time.time() - time.perf_counter()  # to put the audit log's wall-clock times on perf_counter


def _audit_time(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() - WALL_TO_PERF


class AuditLog:
    """The operator's requests, read incrementally from the API server's audit log."""

    def __init__(self, path: Path):
        self.path, self.position = path, 0
        self.requests: list[Request] = []  # completed, watches excluded
        self.watches: list[tuple[float, str]] = []  # (t, plural) of each watch the operator opened
        self.lock = threading.Lock()

    def read(self) -> None:
        with self.lock:
            try:
                with open(self.path, "rb") as file:
                    file.seek(self.position)
                    data = file.read()
            except FileNotFoundError:
                return
            end = data.rfind(b"\n") + 1
            self.position += end
            for line in data[:end].splitlines():
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                ref, verb = entry.get("objectRef") or {}, entry.get("verb", "")
                received = _audit_time(entry["requestReceivedTimestamp"])
                if verb == "watch":
                    if entry.get("stage") == "ResponseStarted":
                        self.watches.append((received, ref.get("resource")))
                    continue
                if entry.get("stage") != "ResponseComplete":
                    continue
                self.requests.append(Request(received, verb, ref.get("resource"), ref.get("subresource"),
                                             ref.get("name"), (entry.get("responseStatus") or {}).get("code", 0),
                                             _audit_time(entry["stageTimestamp"]) - received))

    def between(self, start: float, end: float) -> list[Request]:
        self.read()
        return [r for r in self.requests if start <= r.t < end]


# -- what the watches saw -------------------------------------------------------------------------------
@dataclass
class Recorder:
    """Events of pods and runs in one namespace, with their arrival times (perf_counter)."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    pods: dict[str, dict[str, float]] = field(default_factory=dict)  # pod name -> mark -> first time
    runs: dict[str, dict[str, float]] = field(default_factory=dict)  # run name -> mark -> first time
    phases: dict[str, str] = field(default_factory=dict)  # run name -> latest status.phase
    finalized: set[str] = field(default_factory=set)  # runs carrying kopf's finalizer (kopf's timers need it)
    counts: Counter = field(default_factory=Counter)  # first pods created / recorded: O(1) wait predicates
    run_modified: list[float] = field(default_factory=list)  # times of MODIFIED events of runs

    def event(self, t: float, plural: str, kind: str, body: dict[str, Any]) -> None:
        meta, status = body["metadata"], body.get("status") or {}
        with self.cond:
            if plural == "pods":
                marks = self.pods.setdefault(meta["name"], {})
                if kind == "ADDED":
                    if "added" not in marks and meta["name"].endswith("-1"):
                        self.counts["first pods"] += 1
                    marks.setdefault("added", t)
                elif kind == "DELETED":
                    marks.setdefault("gone", t)
                if kind != "DELETED":
                    if meta.get("deletionTimestamp"):
                        marks.setdefault("deleting", t)
                    if (body.get("spec") or {}).get("nodeName"):
                        marks.setdefault("bound", t)
                    if any(c.get("type") == "PodScheduled" and c.get("status") == "False"
                           for c in status.get("conditions") or []):
                        if "unschedulable" not in marks:
                            self.counts["unschedulable"] += 1
                        marks.setdefault("unschedulable", t)
                    for container in status.get("containerStatuses") or []:
                        if "terminated" in (container.get("state") or {}):
                            marks.setdefault("terminated", t)
            elif plural == "trainingruns":
                marks = self.runs.setdefault(meta["name"], {})
                if kind == "ADDED":
                    marks.setdefault("added", t)
                elif kind == "MODIFIED":
                    self.run_modified.append(t)
                self.phases[meta["name"]] = status.get("phase") or ""
                if kind != "DELETED" and meta.get("finalizers") and meta["name"] not in self.finalized:
                    self.finalized.add(meta["name"])
                if status.get("preemptions"):  # counted in the same write as the next attempt, if the pod is gone
                    marks.setdefault(f"preempted-{status['preemptions']}", t)
                if status.get("podUid") and status.get("currentPod"):
                    mark = f"recorded-{status['currentPod']}"
                    if mark not in marks and mark.endswith("-1"):
                        self.counts["first pods recorded"] += 1
                    marks.setdefault(mark, t)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


class Watcher:
    """A watch per resource in the namespace, from before the first write; each event's arrival
    time is taken before its JSON is parsed."""

    def __init__(self, kube: kf.KubeCluster, recorder: Recorder, plurals=("pods", "trainingruns")):
        self.kube, self.recorder = kube, recorder
        self.stop_event = threading.Event()
        self.errors: list[str] = []
        self.threads = []
        for plural in plurals:
            version = kube.request("GET", kube.path(plural, kube.namespace), params={"limit": 1})["metadata"]["resourceVersion"]
            thread = threading.Thread(target=self._watch, args=(plural, version), name=f"watch-{plural}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _watch(self, plural: str, version: str) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.kube.token}"
        while not self.stop_event.is_set():
            try:
                response = session.get(self.kube.url + self.kube.path(plural, self.kube.namespace), stream=True,
                                       timeout=(10, 660), verify=str(self.kube.plane.ca),
                                       params={"watch": "1", "resourceVersion": version,
                                               "allowWatchBookmarks": "true", "timeoutSeconds": "600"})
                for line in response.iter_lines():
                    t = time.perf_counter()
                    if self.stop_event.is_set():
                        return
                    if not line:
                        continue
                    event = json.loads(line)
                    if event["type"] == "ERROR":
                        self.errors.append(f"{plural}: {event['object']}")
                        return
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self.recorder.event(t, plural, event["type"], event["object"])
            except (requests.RequestException, ValueError) as error:
                if not self.stop_event.is_set():
                    self.errors.append(f"{plural}: {error!r}")
                    time.sleep(0.2)

    def stop(self) -> None:
        self.stop_event.set()


# -- processes ----------------------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads of a process, from /proc/PID/status."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return values


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def plane_cpu(plane: cp.ControlPlane) -> dict[str, float]:
    return {name: cpu_seconds(process.pid) for name, process in plane.processes.items()}


def plane_words(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    short = {"etcd": "etcd", "kube-apiserver": "apiserver", "kube-controller-manager": "controllers",
             "kube-scheduler": "scheduler"}
    return ", ".join(f"{short.get(name, name)} {after[name] - before[name]:.1f} s ({(after[name] - before[name]) / seconds:.2f})"
                     for name in after)


class Cluster:
    """A namespace on the control plane, the watches, Nodes (the harness Kubelet) and one operator
    process; always torn down by close()."""

    def __init__(self, plane: BenchPlane, audit: AuditLog, workdir: Path, name: str, *, kubelet: str,
                 nodes: int = 1, node_taints: list[dict] | None = None, extra_nodes: int = 0):
        self.plane, self.audit, self.workdir = plane, audit, workdir
        self.recorder = Recorder()
        self.kubelet: kf.Kubelet | None = None
        self.operator: kf.OperatorProcess | None = None
        self.watcher: Watcher | None = None
        self.stopped = ""
        self.kube = kf.KubeCluster(plane, name)  # no journal: the benchmark's own watches time the events
        self.namespace = self.kube.namespace
        self.kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace, "labels": {
            "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}}})
        try:
            self.kubelet = kf.Kubelet(self.kube, workdir / "kubelet", shared_paths=[workdir],
                                      interval=0.1 if kubelet == "harness" else NEVER).start(nodes=0)
            for _ in range(nodes):
                self.kubelet.add_node(gpus=8, taints=node_taints)
            for _ in range(extra_nodes):
                self.kubelet.add_node(gpus=8)
            for claim in ("runs", "data"):
                self.kubelet.claim_dir(claim)
            self.watcher = Watcher(self.kube, self.recorder)
            self.operator = kf.OperatorProcess(self.kube, workdir / "operator")
            started = time.perf_counter()
            self.operator.start(*OPERATOR_FLAGS)

            def watching() -> bool:
                self.audit.read()
                return {p for t, p in self.audit.watches if t >= started - 1} >= {"trainingruns", "pods"}
            kf.wait_for(lambda: watching() or not self.operator.running, 60, "the operator's watches")
            if not self.operator.running:
                raise RuntimeError(f"the operator exited at start-up:\n{self.operator.logs()[-3000:]}")
            self.startup = max(t for t, p in self.audit.watches if p in ("trainingruns", "pods")) - started
            time.sleep(1.0)  # let kopf finish its start-up
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.operator.proc.pid

    def close(self) -> None:
        try:
            if self.operator is not None and self.operator.proc is not None:
                began = time.perf_counter()
                code = self.operator.stop(timeout=30)
                self.stopped = f"operator stopped by SIGTERM in {time.perf_counter() - began:.1f} s, exit code {code}"
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            if self.kubelet is not None:
                self.kubelet.close()  # deletes its Nodes: the namespace's pods are then orphans (pod GC)

    def handler_calls(self, start: float, end: float) -> Counter:
        """kopf's "Handler 'x' succeeded" / "Timer 'x' succeeded" lines between two time.time()s."""
        calls: Counter = Counter()
        for line in self.operator.logs().splitlines():
            m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*(Handler|Timer) '(\w+)' (succeeded|failed)", line)
            if m:
                moment = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
                if start <= moment < end:
                    calls[m.group(4) if m.group(5) == "succeeded" else f"{m.group(4)} (failed)"] += 1
        return calls

    def log_summary(self) -> list[str]:
        text = self.operator.logs()
        lines = text.splitlines()
        levels = Counter(m.group(1) for m in (re.search(r" (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", line)
                                              for line in lines) if m)
        def short(message: str) -> str:
            message = re.sub(r"\d+", "N", message)
            return message if len(message) <= 200 else f"{message[:100]} ... {message[-100:]}"
        problems = Counter(short(line.split(" ", 3)[-1]) for line in lines
                           if re.search(r" (WARNING|ERROR|CRITICAL) ", line))
        out = [f"operator log: {len(lines)} lines ({', '.join(f'{k} {v}' for k, v in sorted(levels.items()))}), "
               f"{text.count('Traceback')} tracebacks"]
        out += [f"  {count} x {message}" for message, count in problems.most_common(5)]
        if self.watcher is not None and self.watcher.errors:
            out.append(f"  benchmark watches reconnected {len(self.watcher.errors)} times: {self.watcher.errors[-1][:120]}")
        return out


# -- a scripted kubelet: the writes a kubelet makes, done at once ----------------------------------------
def _patch_pod_status(kube: kf.KubeCluster, name: str, change: Callable[[dict], dict]) -> bool:
    """Read, change, write with the resourceVersion as precondition (as a kubelet does); False if gone."""
    for _ in range(20):
        pod = kube.get("pods", kube.namespace, name)
        if pod is None:
            return False
        try:
            kube.patch("pods", kube.namespace, name, {"metadata": {"resourceVersion": pod["metadata"]["resourceVersion"]},
                                                      "status": change(pod.get("status") or {})}, subresource="status")
            return True
        except kf.ApiError as error:
            if error.status == 404:
                return False
            if error.status != 409:
                raise
    raise RuntimeError(f"could not write the status of pod {name}")


def _container(state: dict, ready: bool) -> list[dict]:
    return [{"name": "trainer", "image": "kontinue:bench", "imageID": "", "containerID": "containerd://bench",
             "ready": ready, "started": "running" in state, "restartCount": 0, "state": state, "lastState": {}}]


def start_pod(kube: kf.KubeCluster, name: str) -> None:
    """Report the container created, then running, on the Node the scheduler bound the pod to
    (Kubelet._admit + _try_start, minus the process)."""
    _patch_pod_status(kube, name, lambda status: {
        **status, "phase": "Pending", "hostIP": "127.0.0.1", "startTime": kf._now(),
        "conditions": kf._merge_conditions(status.get("conditions"), {
            "Initialized": ("True", None, None), "Ready": ("False", "ContainersNotReady", None),
            "ContainersReady": ("False", "ContainersNotReady", None)}),
        "containerStatuses": _container({"waiting": {"reason": "ContainerCreating"}}, False)})
    _patch_pod_status(kube, name, lambda status: {
        **status, "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": kf._merge_conditions(status.get("conditions"), {
            "Ready": ("True", None, None), "ContainersReady": ("True", None, None)}),
        "containerStatuses": _container({"running": {"startedAt": kf._now()}}, True)})


def preempt_pod(kube: kf.KubeCluster, name: str, exit_after: float, preempt_by: str) -> None:
    """The preemption (the Eviction API, or as a kubelet does: DisruptionTarget, then a delete with
    30 s of grace), then the kubelet's part: the trainer exits 75 after `exit_after` s (its SIGTERM
    resume point), the terminated status, and the final deletion (grace 0) right after it, as
    Kubelet._sync does."""
    if preempt_by == "evict":
        kube.evict(name)
    else:
        _patch_pod_status(kube, name, lambda status: {**status, "conditions": kf._merge_conditions(
            status.get("conditions"), {"DisruptionTarget": ("True", "TerminationByKubelet",
                                                            "TerminationByKubelet: the benchmark disrupted the pod")})})
        kube.delete("pods", kube.namespace, name, grace=30)
    time.sleep(exit_after)
    not_ready = ("False", "PodCompleted", None)
    _patch_pod_status(kube, name, lambda status: {
        **status, "phase": "Failed",
        "conditions": kf._merge_conditions(status.get("conditions"), {"Ready": not_ready, "ContainersReady": not_ready}),
        "containerStatuses": _container({"terminated": {
            "exitCode": 75, "reason": "Error", "message": PREEMPTED_WORD, "startedAt": kf._now(-60),
            "finishedAt": kf._now(), "containerID": "containerd://bench"}}, False)})
    kube.delete("pods", kube.namespace, name, grace=0)


# -- statistics ---------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest rank (with 20 samples, p99 is the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def spread(values: list[float], unit: str = "ms", scale: float = 1000.0) -> str:
    if not values:
        return "no samples"
    if unit == "s" and max(values) < 1.0:  # sub-second figures in ms
        unit, scale = "ms", 1000.0
    return (f"p50 {percentile(values, 50) * scale:7.1f}  p99 {percentile(values, 99) * scale:7.1f}  "
            f"max {max(values) * scale:7.1f} {unit}  (n={len(values)})")


def print_table(rows: list[tuple[str, str]]) -> None:
    for label, value in rows:
        print(f"  {label:<44} {value}" if value else label)


def count(requests_: list[Request], verb: str, plural: str, subresource: str | None = None) -> int:
    return sum(1 for r in requests_ if r.verb == verb and r.plural == plural and r.subresource == subresource)


def request_mix(requests_: list[Request]) -> str:
    """Counts by verb and resource, with the answers that were not 2xx."""
    def kind(r: Request) -> str:
        return f"{r.verb.upper()} {r.plural}{'/' + r.subresource if r.subresource else ''}"
    mix, errors = Counter(kind(r) for r in requests_), Counter((kind(r), r.status) for r in requests_ if r.status >= 300)
    return ", ".join(f"{k} {number}" + "".join(f" ({status}: {errors[k, status]})" for kk, status in sorted(errors)
                                                 if kk == k) for k, number in mix.most_common())


def first_gets(audit: AuditLog, since: dict[str, float]) -> dict[str, float]:
    """For each run name, the operator's first GET of it received at or after since[name]."""
    found: dict[str, float] = {}
    audit.read()
    for r in list(audit.requests):
        if r.plural == "trainingruns" and r.verb == "get" and r.subresource is None and r.name in since \
                and r.name not in found and r.t >= since[r.name]:
            found[r.name] = r.t
    return found


# -- 1. resume latency --------------------------------------------------------------------------------
@dataclass
class Preemption:
    run: str
    old: str
    new: str
    signal: float  # the write that preempts (deletionTimestamp set)
    terminated: float | None  # the container's terminated status written
    observed: float | None  # the operator's status write that counted the preemption
    gone: float | None  # the old pod's DELETED
    created: float | None  # the next pod's ADDED
    first_get: float | None  # the operator's first GET of the run after the old pod was gone


def collect(cluster: Cluster, run: str, old: str, new: str, preemptions: int) -> Preemption:
    recorder = cluster.recorder
    pod, marks = recorder.pods.get(old, {}), recorder.runs.get(run, {})
    gone = pod.get("gone")
    first_get = None if gone is None else first_gets(cluster.audit, {run: gone}).get(run)
    return Preemption(run, old, new, pod.get("deleting", float("nan")), pod.get("terminated"),
                      marks.get(f"preempted-{preemptions}"), gone, recorder.pods.get(new, {}).get("added"), first_get)


def bench_resume(args: argparse.Namespace, plane: BenchPlane, audit: AuditLog, workdir: Path) -> list[tuple[str, str]]:
    cluster = Cluster(plane, audit, workdir / "resume", "bench-resume", kubelet=args.kubelet)
    kube, recorder, ns = cluster.kube, cluster.recorder, cluster.namespace
    scripted = args.kubelet == "scripted"
    names = [f"resume-{i:03d}" for i in range(args.preemptions)]
    attempt = dict.fromkeys(names, 1)
    rows: list[tuple[str, str]] = []
    try:
        if not scripted:
            for name in names:
                cluster.kubelet.override_command(name, STAND_IN)
        for name in names:
            kube.create(run_manifest(name, ns))

        def running(name: str) -> bool:  # the operator has seen the current attempt's pod running
            return recorder.phases.get(name) == "Running" and \
                f"recorded-{name}-{attempt[name]}" in recorder.runs.get(name, {})

        def bring_up(batch: list[str]) -> None:
            recorder.wait(lambda: all("bound" in recorder.pods.get(f"{n}-{attempt[n]}", {}) for n in batch), 60,
                          "the pods to be bound to the Node")
            if scripted:
                for name in batch:
                    start_pod(kube, f"{name}-{attempt[name]}")
            recorder.wait(lambda: all(running(n) for n in batch), 120, "the runs to be Running")

        bring_up(names)
        results: dict[str, list[Preemption]] = {"isolated": [], "burst": []}

        def preempt(name: str) -> None:
            old = f"{name}-{attempt[name]}"
            if scripted:
                preempt_pod(kube, old, args.exit_after, args.preempt_by)
            elif args.preempt_by == "evict":
                kube.evict(old)
            else:
                cluster.kubelet.preempt(old, grace=30, wait=False)

        # isolated: one preemption at a time, the operator otherwise idle
        spans: dict[str, list[tuple[float, float]]] = {"isolated": [], "burst": []}
        for name in names:
            began = time.perf_counter()
            preempt(name)
            new = f"{name}-{attempt[name] + 1}"
            recorder.wait(lambda: new in recorder.pods, 60, f"pod {new}")
            spans["isolated"].append((began, time.perf_counter()))
            time.sleep(0.2)  # the audit log's last lines
            results["isolated"].append(collect(cluster, name, f"{name}-{attempt[name]}", new, 1))
            attempt[name] += 1
            bring_up([name])
            time.sleep(args.gap)
        time.sleep(1.0)
        # burst: every run's pod preempted at the same moment
        began = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(preempt, names))
        recorder.wait(lambda: all(f"{n}-{attempt[n] + 1}" in recorder.pods for n in names), 120, "the next pods")
        spans["burst"].append((began, time.perf_counter()))
        time.sleep(0.5)  # the old pods' last events
        for name in names:
            results["burst"].append(collect(cluster, name, f"{name}-{attempt[name]}", f"{name}-{attempt[name] + 1}", 2))

        kubelet_words = ("scripted kubelet: the benchmark writes the kubelet's status updates and deletions itself, "
                         f"the container 'exits' {args.exit_after:g} s after the preemption" if scripted else
                         "harness kubelet (tests.kube_fixtures.Kubelet, 0.1 s poll) running a stand-in that "
                         "exits 75 on SIGTERM")
        how = "the Eviction API" if args.preempt_by == "evict" else "DisruptionTarget + delete (30 s grace)"
        rows.append((f"1. resume latency, {len(names)} runs, preempted by {how}; {kubelet_words}", ""))
        for mode, samples in results.items():
            missing = sum(1 for s in samples if s.created is None or s.gone is None)
            rows.append((f"  {mode} ({'one preemption at a time' if mode == 'isolated' else 'all runs preempted at once'})"
                         + (f", {missing} incomplete samples left out" if missing else ""), ""))
            complete = [s for s in samples if s.created is not None and s.gone is not None]
            observed = [s for s in complete if s.observed is not None]
            terminated = [s for s in complete if s.terminated is not None]
            rows += [
                ("preemption observed -> next pod created", spread([s.created - s.observed for s in observed])),
                ("old pod gone -> next pod created", spread([s.created - s.gone for s in complete])),
                ("  of which: gone -> operator's first GET", spread([s.first_get - s.gone for s in complete
                                                                   if s.first_get is not None])),
                ("container terminated -> next pod created", spread([s.created - s.terminated for s in terminated])),
                ("preemption (deletion) -> next pod created", spread([s.created - s.signal for s in complete])),
            ]
            during = [r for span in spans[mode] for r in audit.between(*span)]
            rows.append(("operator requests, preemption -> next pod", f"{len(during) / max(1, len(samples)):.1f} per "
                         "preemption: " + request_mix(during)))
            before = sum(1 for s in observed if s.gone is not None and s.observed < s.gone)
            rows.append((f"  (preemption recorded before the old pod was gone in {before} of {len(observed)}; "
                         f"missing in {len(complete) - len(observed)})", ""))
        rows.append((f"  operator start-up {cluster.startup:.1f} s (process start -> watches open), peak RSS "
                     f"{proc_status(cluster.pid).get('VmHWM', 0) / 1024:.0f} MiB", ""))
        rows += [(line, "") for line in cluster.log_summary()]
    finally:
        cluster.close()
    rows.append((f"  {cluster.stopped}", ""))
    return rows


# -- 2. scale -----------------------------------------------------------------------------------------
def probe(cluster: Cluster, name: str, args: argparse.Namespace) -> dict[str, float]:
    """One new run under load: created -> its pod; then the pod is scheduled, runs, is preempted,
    and is replaced."""
    kube, recorder, timeout = cluster.kube, cluster.recorder, args.scale_timeout
    kube.create(run_manifest(name, cluster.namespace, tolerate_probe_node=True))
    recorder.wait(lambda: "bound" in recorder.pods.get(f"{name}-1", {}), timeout, f"pod {name}-1 bound")
    start_pod(kube, f"{name}-1")
    recorder.wait(lambda: recorder.phases.get(name) == "Running", timeout, f"run {name} Running")
    preempt_pod(kube, f"{name}-1", args.exit_after, args.preempt_by)
    recorder.wait(lambda: f"{name}-2" in recorder.pods, timeout, f"pod {name}-2")
    pods, run = recorder.pods, recorder.runs[name]
    return {"created": pods[f"{name}-1"]["added"] - run["added"],
            "bound": pods[f"{name}-1"]["bound"] - pods[f"{name}-1"]["added"],
            "resumed": pods[f"{name}-2"]["added"] - pods[f"{name}-1"]["gone"]}


def bench_scale(args: argparse.Namespace, plane: BenchPlane, audit: AuditLog, workdir: Path) -> list[tuple[str, str]]:
    cluster = Cluster(plane, audit, workdir / "scale", "bench-scale", kubelet="scripted", nodes=1,
                      node_taints=[PROBE_TAINT], extra_nodes=args.scale_nodes)
    kube, recorder, pid, ns = cluster.kube, cluster.recorder, cluster.pid, cluster.namespace
    rows: list[tuple[str, str]] = []
    names = [f"run-{i:04d}" for i in range(args.runs)]
    n = len(names)
    try:
        idle = proc_status(pid)
        bench_rss0 = proc_status(os.getpid())
        plane_rss0 = {name: proc_status(p.pid).get("VmRSS", 0) for name, p in plane.processes.items()}
        op_cpu0, bench_cpu0, plane0 = cpu_seconds(pid), time.process_time(), plane_cpu(plane)

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.create_threads) as pool:
            list(pool.map(lambda name: kube.create(run_manifest(name, ns)), names))
        created = time.perf_counter()
        timed_out = None
        try:
            recorder.wait(lambda: recorder.counts["first pods"] >= n, args.scale_timeout, "every run's first pod")
            all_pods = time.perf_counter()
            recorder.wait(lambda: recorder.counts["first pods recorded"] >= n, args.scale_timeout,
                          "every pod recorded in its run's status")
            settled = time.perf_counter()
        except TimeoutError as error:
            timed_out = str(error)
            all_pods = settled = time.perf_counter()
        ramp_op_cpu, ramp_bench_cpu, plane1 = cpu_seconds(pid) - op_cpu0, time.process_time() - bench_cpu0, plane_cpu(plane)
        ramp_requests = audit.between(start, settled)
        first_pods = [f"{name}-1" for name in names]
        pod_times = sorted(recorder.pods[p]["added"] for p in first_pods if "added" in recorder.pods.get(p, {}))
        added = {name: recorder.runs[name]["added"] for name in names if "added" in recorder.runs.get(name, {})}
        gets = first_gets(audit, added)
        to_pod = [recorder.pods[f"{name}-1"]["added"] - t for name, t in added.items()
                  if "added" in recorder.pods.get(f"{name}-1", {})]
        to_get = [gets[name] - t for name, t in added.items() if name in gets]
        unschedulable = recorder.counts["unschedulable"]
        after_ramp = proc_status(pid)
        finalized_after_ramp = len(recorder.finalized)
        # kopf puts its finalizer on every run (because of the timer), after the run's first event
        # handler has returned: once every run has it, kopf has caught up with the ramp
        try:
            if not timed_out:
                recorder.wait(lambda: len(recorder.finalized) >= n, args.scale_timeout, "kopf's finalizer on every run")
        except TimeoutError as error:
            timed_out = str(error)
        all_finalized = time.perf_counter()
        caught_up_requests = audit.between(start, all_finalized)

        # the steady state: n idle runs (pods Pending for ever)
        time.sleep(5.0)
        finalized_at_start = len(recorder.finalized)
        window_start, op_cpu1, bench_cpu1, plane2 = time.perf_counter(), cpu_seconds(pid), time.process_time(), plane_cpu(plane)
        wall_start = time.time()
        time.sleep(args.idle_seconds)
        window_end, wall_end = time.perf_counter(), time.time()
        finalized_at_end = len(recorder.finalized)
        idle_op_cpu, idle_bench_cpu, plane3 = cpu_seconds(pid) - op_cpu1, time.process_time() - bench_cpu1, plane_cpu(plane)
        idle_requests = audit.between(window_start, window_end)
        window = window_end - window_start
        run_changes = sum(1 for t in list(recorder.run_modified) if window_start <= t < window_end)

        # new runs under that load, a second apart: created -> pod; pod gone (preempted) -> next pod
        probe_names = [f"probe-{i}" for i in range(args.probes if not timed_out else 0)]
        probes = []
        with concurrent.futures.ThreadPoolExecutor(max(1, args.probes)) as pool:
            futures = []
            for name in probe_names:
                futures.append(pool.submit(probe, cluster, name, args))
                time.sleep(1.0)
            for future in futures:
                try:
                    probes.append(future.result())
                except TimeoutError as error:
                    rows.append((f"  probe failed: {error}", ""))
        probe_gets = first_gets(audit, {name: recorder.runs[name]["added"] for name in probe_names
                                        if "added" in recorder.runs.get(name, {})})
        final, bench_final = proc_status(pid), proc_status(os.getpid())
        plane_final = {name: proc_status(p.pid) for name, p in plane.processes.items()}

        writes = [r for r in idle_requests if r.verb in ("patch", "update") and r.plural == "trainingruns"]
        reconciles = count(idle_requests, "get", "trainingruns")
        ramp = settled - start
        nodes = f"{args.scale_nodes} untainted Node(s) that run nothing (pods bound, stay Pending)" if args.scale_nodes \
            else "no Node can take their pods: the scheduler marks them Unschedulable"
        rows[:0] = [(f"2. scale: {n} TrainingRuns created at once ({args.create_threads} client threads), {nodes}", "")]
        if timed_out:
            rows.append((f"  TIMED OUT: {timed_out}; {len(pod_times)} of {n} first pods existed, "
                         f"{len(recorder.finalized)} runs had kopf's finalizer (probes skipped)", ""))
        rows += [
            ("all runs created (client side)", f"{created - start:7.2f} s  ({n / (created - start):.0f} creates/s)"),
            ("first pod created", f"{pod_times[0] - start:7.2f} s after the first create" if pod_times else "-"),
            ("half of the first pods exist", f"{pod_times[len(pod_times) // 2] - start:7.2f} s" if pod_times else "-"),
            ("every run has its first pod", f"{all_pods - start:7.2f} s  -> {len(pod_times) / (all_pods - start):.1f} runs/s"),
            ("every pod recorded in its run (podUid)", f"{settled - start:7.2f} s  ({unschedulable} pods marked "
                                                       "Unschedulable by then)"),
            ("every run has kopf's finalizer", f"{all_finalized - start:7.2f} s  ({finalized_after_ramp} of {n} "
                                               "when every pod was recorded)"),
            ("per run: run created -> its pod created", spread(to_pod, "s", 1.0)),
            ("per run: run created -> operator's first GET", spread(to_get, "s", 1.0)),
            ("operator requests until every pod recorded", f"{len(ramp_requests)} = {len(ramp_requests) / n:.1f} per run: "
                                                          + request_mix(ramp_requests)),
            ("  until every finalizer", f"{len(caught_up_requests)} = {len(caught_up_requests) / n:.1f} per run"),
            ("  API server time per operator request", spread([r.duration for r in ramp_requests])),
            ("operator CPU until every pod recorded", f"{ramp_op_cpu:.1f} s ({ramp_op_cpu / ramp:.2f} cores); "
                                                      f"benchmark process (watches + client) {ramp_bench_cpu:.1f} s "
                                                      f"({ramp_bench_cpu / ramp:.2f})"),
            ("control plane CPU, same interval", plane_words(plane0, plane1, ramp)),
            ("operator RSS idle / after the ramp / end", f"{idle.get('VmRSS', 0) / 1024:.0f} / "
                                                         f"{after_ramp.get('VmRSS', 0) / 1024:.0f} / "
                                                         f"{final.get('VmRSS', 0) / 1024:.0f} MiB"),
            ("operator peak RSS (VmHWM)", f"{final.get('VmHWM', 0) / 1024:.0f} MiB = idle + "
                                          f"{(final.get('VmHWM', 0) - idle.get('VmRSS', 0)) / max(1, n):.0f} kB per run; "
                                          f"{final.get('Threads', 0)} threads"),
            ("control plane RSS before -> peak", ", ".join(
                f"{name} {plane_rss0[name] / 1024:.0f} -> {plane_final[name].get('VmHWM', 0) / 1024:.0f} MiB"
                for name in plane_final)),
            ("benchmark process RSS start / peak", f"{bench_rss0.get('VmRSS', 0) / 1024:.0f} / "
                                                   f"{bench_final.get('VmHWM', 0) / 1024:.0f} MiB"),
            (f"steady state: {n} idle runs, {window:.0f} s window", ""),
            ("operator requests/s", f"{len(idle_requests) / window:.1f} = {len(idle_requests) / window / max(1, n) * 10:.2f} "
                                    f"per run per 10 s: " + request_mix(idle_requests)),
            ("  reconciles/s (GETs of a run)", f"{reconciles / window:.1f} (one per run per 60 s would be {n / 60:.1f}/s)"),
            ("  handler calls/s (operator log)", ", ".join(f"{name} {calls / window:.1f}" for name, calls in
                                                            cluster.handler_calls(wall_start, wall_end).most_common())),
            ("  runs with kopf's finalizer", f"{finalized_at_start} at the window's start, {finalized_at_end} at its end"),
            ("  operator writes to runs / run changes seen", f"{len(writes)} / {run_changes}"),
            ("  API server time per operator request", spread([r.duration for r in idle_requests])),
            ("operator CPU", f"{idle_op_cpu / window:.2f} cores" + (
                f" = {1000 * idle_op_cpu / reconciles:.1f} ms per reconcile" if reconciles else "")),
            ("control plane CPU (s, cores)", plane_words(plane2, plane3, window)),
            ("benchmark process CPU", f"{idle_bench_cpu / window:.2f} cores"),
            (f"{len(probes)} new runs under this load, 1 s apart (they tolerate the probe Node's taint)", ""),
            ("run created -> operator's first GET", spread([probe_gets[p] - recorder.runs[p]["added"]
                                                            for p in probe_gets], "s", 1.0)),
            ("run created -> its pod created", spread([p["created"] for p in probes], "s", 1.0)),
            ("its pod created -> bound by the scheduler", spread([p["bound"] for p in probes], "s", 1.0)),
            ("its pod evicted: old pod gone -> next pod", spread([p["resumed"] for p in probes], "s", 1.0)),
        ]
        rows += [(line, "") for line in cluster.log_summary()]
    finally:
        cluster.close()
    rows.append((f"  {cluster.stopped}", ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preemptions", type=int, default=20, help="runs preempted in the resume-latency part (0: skip)")
    parser.add_argument("--kubelet", choices=("scripted", "harness"), default="scripted",
                        help="who plays the kubelet in part 1 (default: the benchmark's scripted writes)")
    parser.add_argument("--preempt-by", choices=("evict", "kubelet"), default="evict",
                        help="the Eviction API (default), or DisruptionTarget + a delete with 30 s of grace")
    parser.add_argument("--exit-after", type=float, default=0.5,
                        help="scripted kubelet: seconds from the preemption to the container's exit")
    parser.add_argument("--gap", type=float, default=0.3, help="pause between isolated preemptions (s)")
    parser.add_argument("--runs", type=int, default=1000, help="TrainingRuns created at once in the scale part (0: skip)")
    parser.add_argument("--scale-nodes", type=int, default=0,
                        help="untainted Nodes in the scale part (110 pods each; nobody runs their pods); "
                             "default 0: the pods are Unschedulable")
    parser.add_argument("--create-threads", type=int, default=8, help="client threads creating the runs")
    parser.add_argument("--scale-timeout", type=float, default=300.0, help="give up waiting for the pods after (s)")
    parser.add_argument("--idle-seconds", type=float, default=75.0,
                        help="steady-state window (s); longer than the operator's 60 s safety net")
    parser.add_argument("--probes", type=int, default=5, help="single runs created under the steady-state load")
    args = parser.parse_args(argv)

    total_start = time.perf_counter()
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, python {platform.python_version()}, "
          f"kopf {version('kopf')}, kubernetes client {version('kubernetes')}, control plane v{cp.VERSION} "
          "(etcd, kube-apiserver, kube-controller-manager, kube-scheduler)", flush=True)
    print(f"operator code: {code_state()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="kontinue-bench-operator-"))
    rows: list[tuple[str, str]] = []
    plane = None
    try:
        began = time.perf_counter()
        plane = start_plane(workdir / "plane")
        print(f"control plane up, CRDs established, in {time.perf_counter() - began:.1f} s", flush=True)
        audit = AuditLog(plane.audit_path)
        if args.preemptions:
            rows += bench_resume(args, plane, audit, workdir)
            print_table(rows)
            print(flush=True)
        if args.runs:
            scale = bench_scale(args, plane, audit, workdir)
            print_table(scale)
    finally:
        if plane is not None:
            plane.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"total benchmark wall time {time.perf_counter() - total_start:.0f} s")
    return 0


def code_state() -> str:
    """The commit and whether kontinue/operator differs from it (the figures are for the working tree)."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kontinue/operator"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    changed = [path for path in dirty if path.startswith("kontinue/")]
    return f"{head}" + (f" + uncommitted changes in {', '.join(changed)}" if changed else " (clean)")


def version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version(package)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
