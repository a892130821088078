"""Operator benchmark: kontinue's operator (`python -m kontinue operator`, its own process) against the
harness's Kubernetes API emulator (tests/kube_fixtures.py: kmock over real HTTP, in a thread of this
process), on this machine's CPU. The operator runs with `--standalone --namespace bench
--metrics-port 0 --health-port 0`.

1. **Resume latency.** --preemptions runs whose pods are played by a scripted kubelet (default: this
   script makes the API writes the harness kubelet makes, with no process behind them) or by the
   harness kubelet running a cheap stand-in for the trainer that exits 75 on SIGTERM (--kubelet
   harness). Each run's pod is preempted as the control plane and the kubelet do it
   (DisruptionTarget condition, deletion with a grace period, the container's exit with the
   trainer's "preempted" code 75, the terminated status, then the kubelet's final deletion),
   first one run at a time ("isolated") and then all runs at once ("burst"). Measured, per
   preemption, until the next attempt's pod object exists: from the operator recording the
   preemption (its status write that counts it), from the old pod object being gone (its
   DELETED), from the terminated container status, and from the preemption (the deletion that sets
   deletionTimestamp).
2. **Scale.** --runs TrainingRuns created at once, no kubelet (the pods only need to exist): time
   until every run has its first pod, until the operator has recorded every pod in its run's
   status, and until kopf has put its finalizer on every run (kopf adds one to every object
   with a timer); runs/s; the operator's peak RSS (VmHWM from /proc) and CPU time. Then, once
   kopf has caught up, the steady load the operator puts on the API server with that many idle
   runs (a 10 s kopf timer per run, which reconciles a Pending run once a minute), and how quickly it reacts, under that load, to --probes new
   runs and to their pods' preemption.

How it times: on the emulator's side, when a write is committed (a class-level wrapper around
`ApiServer._emit`, in this process only; tests/ is not changed), with time.perf_counter. Request
counts and the emulator's time per request come from a wrapper around `ApiServer._handle`; the
operator's requests are told from this script's by their User-Agent (this script's are
python-requests). No polling: the script waits on a condition that the wrapper notifies.

The emulator is made to route reads in constant time (see _fast_kmock_routing; --keep-request-log
turns that off): kmock's own routing slows down with every request served, which would measure kmock.

    python benchmarks/bench_operator.py [--preemptions N] [--runs N] [--kubelet scripted|harness]
"""

from __future__ import annotations

import argparse
import concurrent.futures
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing; tests/ holds the harness

from tests import kube_fixtures as kf  # noqa: E402

NAMESPACE = "bench"
OPERATOR_FLAGS = ("--metrics-port", "0", "--health-port", "0")  # + --standalone --namespace bench (the default command)
STAND_IN = [sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, lambda *a: exit(75)); time.sleep(600)"]
PREEMPTED_WORD = json.dumps({"result": "preempted", "step": 42})  # the trainer's termination message on SIGTERM


def run_manifest(name: str) -> dict[str, Any]:
    """A minimal valid TrainingRun with its data and run directory on claims (the pods never run
    the trainer, so the files need not exist)."""
    return {
        "apiVersion": "kontinue.dev/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"task": {"label": "label"}, "data": {"train": "/data/train.parquet"},
                 "model": {"hfText": {"checkpoint": "/models/minilm"}},
                 "checkpoint": {"storage": "/runs"}, "maxPreemptions": 1000,
                 "volumes": [{"name": "runs", "claimName": "runs", "mountPath": "/runs"},
                             {"name": "data", "claimName": "data", "mountPath": "/data", "readOnly": True}]},
    }


# -- instrumentation of the emulator ------------------------------------------------------------------
@dataclass
class Request:
    t: float
    operator: bool
    method: str
    action: str
    plural: str | None
    subresource: str | None
    name: str | None
    duration: float = 0.0
    wrote: bool = False  # the resourceVersion moved (a no-op PATCH does not move it)
    status: int = 200


@dataclass
class Recorder:
    """What the emulator saw, with times (perf_counter, this process). One per cluster."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    pods: dict[str, dict[str, float]] = field(default_factory=dict)  # pod name -> mark -> first time
    runs: dict[str, dict[str, float]] = field(default_factory=dict)  # run name -> mark -> first time
    phases: dict[str, str] = field(default_factory=dict)  # run name -> latest status.phase
    finalized: set[str] = field(default_factory=set)  # runs carrying kopf's finalizer (kopf's timers need it)
    counts: Counter = field(default_factory=Counter)  # first pods created / recorded: O(1) wait predicates
    requests: list[Request] = field(default_factory=list)
    watches: list[tuple[float, str, bool]] = field(default_factory=list)  # (t, plural, by the operator)

    def emitted(self, t: float, plural: str, kind: str, body: dict[str, Any]) -> None:
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
                else:
                    if meta.get("deletionTimestamp"):
                        marks.setdefault("deleting", t)
                    for container in status.get("containerStatuses") or []:
                        if "terminated" in (container.get("state") or {}):
                            marks.setdefault("terminated", t)
            elif plural == "trainingruns":
                marks = self.runs.setdefault(meta["name"], {})
                if kind == "ADDED":
                    marks.setdefault("added", t)
                self.phases[meta["name"]] = status.get("phase") or ""
                if kind != "DELETED" and meta.get("finalizers"):
                    self.finalized.add(meta["name"])
                if status.get("preemptions"):  # counted in the same write as the next attempt, if the pod is gone
                    marks.setdefault(f"preempted-{status['preemptions']}", t)
                if status.get("podUID") and status.get("currentPod"):
                    mark = f"recorded-{status['currentPod']}"
                    if mark not in marks and mark.endswith("-1"):
                        self.counts["first pods recorded"] += 1
                    marks.setdefault(mark, t)
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")

    def operator_requests(self, start: float, end: float) -> list[Request]:
        return [r for r in list(self.requests) if r.operator and start <= r.t < end]


RECORDER: Recorder | None = None
KEEP_REQUEST_LOG = False  # --keep-request-log: leave kmock's request log unbounded, as the tests have it


def instrument() -> None:
    """Wrap the emulator's write journal and request handler (class-level, in this process only)."""
    if getattr(kf.ApiServer, "_bench_wrapped", False):
        return
    emit, handle, serve_watch = kf.ApiServer._emit, kf.ApiServer._handle, kf.ApiServer._serve_watch

    async def _emit(self, resource, kind, body):
        if RECORDER is not None:
            RECORDER.emitted(time.perf_counter(), resource.plural, kind, body)
        await emit(self, resource, kind, body)

    async def _handle(self, request):
        if not KEEP_REQUEST_LOG:  # see _fast_kmock_routing
            for log in [getattr(self, "_requests", None)] + [getattr(p, "_requests", None) for p in self._payloads]:
                if log is not None and len(log) > 4096:
                    del log[:-2048]
        agent = next((value for key, value in request.headers.items() if key.lower() == "user-agent"), "")
        resource = request.resource
        record = Request(time.perf_counter(), not agent.startswith("python-requests"), str(request.method),
                         str(request.action), resource.plural if resource else None, request.subresource,
                         request.name)
        rv = self._rv
        try:
            response = await handle(self, request)
            record.status = getattr(response, "status", 200)
            return response
        except Exception as error:
            record.status = getattr(error, "status", 500)
            raise
        finally:
            record.duration = time.perf_counter() - record.t
            record.wrote = self._rv != rv
            if RECORDER is not None and "WATCH" not in record.action.upper():
                RECORDER.requests.append(record)

    async def _serve_watch(self, request):
        if RECORDER is not None:
            agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
            with RECORDER.cond:
                RECORDER.watches.append((time.perf_counter(), request.resource.plural,
                                         not agent.startswith("python-requests")))
                RECORDER.cond.notify_all()
        async for chunk in serve_watch(self, request):
            yield chunk

    kf.ApiServer._emit, kf.ApiServer._handle, kf.ApiServer._serve_watch = _emit, _handle, _serve_watch
    _fast_kmock_routing()
    kf.ApiServer._bench_wrapped = True


def _fast_kmock_routing() -> None:
    """Take kmock's request log out of its routing of reads.

    kmock appends every request to a log and routes a read (GET, LIST, WATCH; writes go to the
    harness's own code) by asking each of its 14 fallback reactions whether the request is "in" its
    filter, which kmock answers by iterating over the whole log and applying the filter to every
    request in it. A read thus costs more with every request served, about 0.08 ms more per request
    so far (measured here: a GET took 9 ms after 100 requests, 84 ms after 1,000, 168 ms after
    2,000), all of it in the emulator's one thread; with it, 100 runs do not all get their pod within
    90 s (--keep-request-log). A real API server has nothing like it. Here membership of a request in a filter
    chain (Filter, Priority, the root) is answered directly: the filter's criteria on the request
    itself, and identity among the root's latest requests; any other view keeps kmock's own answer.
    The logs are also kept bounded (the last 2,048-4,096 requests); only kmock's assertions read them.
    """
    from kmock._internal import dsl, rendering

    if KEEP_REQUEST_LOG or getattr(dsl.View, "_bench_fast", False):
        return
    original = dsl.View.__contains__

    def contains(self, item):
        if isinstance(item, rendering.Request):
            kind = type(self)
            if isinstance(self, dsl.Root):
                return any(request is item for request in reversed(self._requests))
            if kind is dsl.Filter:
                return bool(self.criteria(item)) and contains(self._source, item)
            if kind is dsl.Priority:
                return contains(self._source, item)
        return original(self, item)

    dsl.View.__contains__ = contains
    dsl.View._bench_fast = True


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


class Cluster:
    """One emulator + one operator process, instrumented; always torn down by close()."""

    def __init__(self, workdir: Path, kubelet: str | None = None):
        global RECORDER
        instrument()
        self.workdir = workdir
        self.recorder = RECORDER = Recorder()
        self.kubelet: kf.Kubelet | None = None
        self.operator: kf.OperatorProcess | None = None
        self.stopped = ""  # how the operator stopped, for the report
        self.kube = kf.KubeCluster(NAMESPACE).start()
        try:
            if kubelet == "harness":
                self.kubelet = kf.Kubelet(self.kube, workdir / "kubelet", shared_paths=[workdir]).start()
            self.operator = kf.OperatorProcess(self.kube, workdir / "operator")
            started = time.perf_counter()
            self.operator.start(*OPERATOR_FLAGS)
            self.recorder.wait(lambda: {p for _, p, op in self.recorder.watches if op} >= {"trainingruns", "pods"}
                               or not self.operator.running, 60, "the operator's watches")
            if not self.operator.running:
                raise RuntimeError(f"the operator exited at start-up:\n{self.operator.logs()[-3000:]}")
            self.startup = time.perf_counter() - started  # process start -> both watches open
            time.sleep(1.0)  # let kopf finish its start-up
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.operator.proc.pid

    def close(self) -> None:
        try:
            if self.kubelet is not None:
                self.kubelet.close()
        finally:
            try:
                if self.operator is not None and self.operator.proc is not None:
                    began = time.perf_counter()
                    code = self.operator.stop(timeout=30)
                    self.stopped = f"operator stopped by SIGTERM in {time.perf_counter() - began:.1f} s, exit code {code}"
            finally:
                self.kube.stop()

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
        problems = Counter(re.sub(r"\d+", "N", line.split(" ", 3)[-1])[:140] for line in lines
                           if re.search(r" (WARNING|ERROR|CRITICAL) ", line))
        out = [f"operator log: {len(lines)} lines ({', '.join(f'{k} {v}' for k, v in sorted(levels.items()))}), "
               f"{text.count('Traceback')} tracebacks"]
        out += [f"  {count} x {message}" for message, count in problems.most_common(5)]
        return out


# -- a scripted kubelet: the writes the harness kubelet makes, done at once -----------------------------
def _patch_pod_status(kube: kf.KubeCluster, name: str, change: Callable[[dict], dict]) -> bool:
    """Read, change, write with the resourceVersion as precondition (as a kubelet does); False if gone."""
    for _ in range(20):
        pod = kube.get("pods", NAMESPACE, name)
        if pod is None:
            return False
        try:
            kube.patch("pods", NAMESPACE, name, {"metadata": {"resourceVersion": pod["metadata"]["resourceVersion"]},
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
    """Bind the pod and report its container running (Kubelet._admit + _try_start, minus the process)."""
    kube.patch("pods", NAMESPACE, name, {"spec": {"nodeName": kf.Kubelet.node_name}})
    _patch_pod_status(kube, name, lambda status: {
        **status, "phase": "Pending", "hostIP": "127.0.0.1", "startTime": kf._now(),
        "conditions": kf._merge_conditions(status.get("conditions"), {
            "PodScheduled": ("True", None, None), "Initialized": ("True", None, None),
            "Ready": ("False", "ContainersNotReady", None), "ContainersReady": ("False", "ContainersNotReady", None)}),
        "containerStatuses": _container({"waiting": {"reason": "ContainerCreating"}}, False)})
    _patch_pod_status(kube, name, lambda status: {
        **status, "phase": "Running", "podIP": "127.0.0.1",
        "conditions": kf._merge_conditions(status.get("conditions"), {
            "Ready": ("True", None, None), "ContainersReady": ("True", None, None)}),
        "containerStatuses": _container({"running": {"startedAt": kf._now()}}, True)})


def preempt_pod(kube: kf.KubeCluster, name: str, exit_after: float) -> None:
    """As Kubelet.preempt and the kubelet's reaction to it: DisruptionTarget, deletion with 30 s of
    grace, the trainer exiting 75 after `exit_after` s (its SIGTERM resume point), the terminated
    status, and the kubelet's final deletion (grace 0) right after it, as Kubelet._sync does."""
    _patch_pod_status(kube, name, lambda status: {**status, "conditions": kf._merge_conditions(
        status.get("conditions"), {"DisruptionTarget": ("True", "PreemptionByScheduler",
                                                        "PreemptionByScheduler: the benchmark disrupted the pod")})})
    kube.delete("pods", NAMESPACE, name, grace=30)
    time.sleep(exit_after)
    not_ready = ("False", "PodCompleted", None)
    _patch_pod_status(kube, name, lambda status: {
        **status, "phase": "Failed",
        "conditions": kf._merge_conditions(status.get("conditions"), {"Ready": not_ready, "ContainersReady": not_ready}),
        "containerStatuses": _container({"terminated": {
            "exitCode": 75, "reason": "Error", "message": PREEMPTED_WORD, "startedAt": kf._now(-60),
            "finishedAt": kf._now(), "containerID": "containerd://bench"}}, False)})
    kube.delete("pods", NAMESPACE, name, grace=0)


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


# -- 1. resume latency --------------------------------------------------------------------------------
@dataclass
class Preemption:
    run: str
    old: str
    new: str
    signal: float  # the deletion that preempts (deletionTimestamp set)
    terminated: float | None  # the container's terminated status written
    observed: float | None  # the operator's status write that counted the preemption
    gone: float | None  # the old pod's DELETED
    created: float | None  # the next pod's ADDED
    first_read: float | None  # the operator's first GET of the run after the old pod was gone


def collect(recorder: Recorder, run: str, old: str, new: str, preemptions: int) -> Preemption:
    pod, marks = recorder.pods.get(old, {}), recorder.runs.get(run, {})
    gone = pod.get("gone")
    first_read = None
    if gone is not None:
        first_read = next((r.t for r in list(recorder.requests) if r.operator and r.t >= gone and r.method.endswith("GET")
                           and r.plural == "trainingruns" and r.name == run), None)
    return Preemption(run, old, new, pod.get("deleting", float("nan")), pod.get("terminated"),
                      marks.get(f"preempted-{preemptions}"), gone, recorder.pods.get(new, {}).get("added"), first_read)


def bench_resume(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str]]:
    cluster = Cluster(workdir / "resume", kubelet=args.kubelet)
    kube, recorder = cluster.kube, cluster.recorder
    scripted = args.kubelet == "scripted"
    names = [f"resume-{i:03d}" for i in range(args.preemptions)]
    attempt = dict.fromkeys(names, 1)
    rows: list[tuple[str, str]] = []
    try:
        if not scripted:
            for name in names:
                cluster.kubelet.override_command(name, STAND_IN)
        for name in names:
            kube.create(run_manifest(name))

        def running(name: str) -> bool:  # the operator has seen the current attempt's pod running
            return recorder.phases.get(name) == "Running" and \
                f"recorded-{name}-{attempt[name]}" in recorder.runs.get(name, {})

        def bring_up(batch: list[str]) -> None:
            recorder.wait(lambda: all(f"{n}-{attempt[n]}" in recorder.pods for n in batch), 60, "the pods")
            if scripted:
                for name in batch:
                    start_pod(kube, f"{name}-{attempt[name]}")
            recorder.wait(lambda: all(running(n) for n in batch), 120, "the runs to be Running")

        bring_up(names)
        results: dict[str, list[Preemption]] = {"isolated": [], "burst": []}

        def preempt(name: str) -> None:
            old = f"{name}-{attempt[name]}"
            if scripted:
                preempt_pod(kube, old, args.exit_after)
            else:
                cluster.kubelet.preempt(old, grace=30, wait=False)

        # isolated: one preemption at a time, the operator otherwise idle
        for name in names:
            preempt(name)
            new = f"{name}-{attempt[name] + 1}"
            recorder.wait(lambda: new in recorder.pods, 60, f"pod {new}")
            results["isolated"].append(collect(recorder, name, f"{name}-{attempt[name]}", new, 1))
            attempt[name] += 1
            bring_up([name])
            time.sleep(args.gap)
        time.sleep(1.0)
        # burst: every run's pod preempted at the same moment
        with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
            list(pool.map(preempt, names))
        recorder.wait(lambda: all(f"{n}-{attempt[n] + 1}" in recorder.pods for n in names), 120, "the next pods")
        time.sleep(0.5)  # the old pods' last events
        for name in names:
            results["burst"].append(collect(recorder, name, f"{name}-{attempt[name]}", f"{name}-{attempt[name] + 1}", 2))

        kubelet_words = ("scripted kubelet: the benchmark writes the kubelet's status updates and deletions itself, "
                         f"the container 'exits' {args.exit_after:g} s after the preemption" if scripted else
                         "harness kubelet (tests.kube_fixtures.Kubelet, 0.1 s poll) running a stand-in that "
                         "exits 75 on SIGTERM")
        rows.append((f"1. resume latency, {len(names)} runs, {kubelet_words}", ""))
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
                ("  of which: gone -> operator's first GET", spread([s.first_read - s.gone for s in complete
                                                                   if s.first_read is not None])),
                ("container terminated -> next pod created", spread([s.created - s.terminated for s in terminated])),
                ("preemption (deletion) -> next pod created", spread([s.created - s.signal for s in complete])),
            ]
            before = sum(1 for s in observed if s.gone is not None and s.observed < s.gone)
            rows.append((f"  (Preempted recorded before the old pod was gone in {before} of {len(observed)}; "
                         f"missing in {len(complete) - len(observed)})", ""))
        rows.append((f"  operator start-up {cluster.startup:.1f} s (process start -> watches open), peak RSS "
                     f"{proc_status(cluster.pid).get('VmHWM', 0) / 1024:.0f} MiB", ""))
        rows += [(line, "") for line in cluster.log_summary()]
    finally:
        cluster.close()
    rows.append((f"  {cluster.stopped}", ""))
    return rows


# -- 2. scale -----------------------------------------------------------------------------------------
def first_reads(recorder: Recorder, since: dict[str, float]) -> dict[str, float]:
    """For each run name, the operator's first GET of it at or after since[name]."""
    found: dict[str, float] = {}
    for r in list(recorder.requests):
        if r.operator and r.plural == "trainingruns" and r.name in since and r.name not in found \
                and r.method.endswith("GET") and r.t >= since[r.name]:
            found[r.name] = r.t
    return found


def probe(cluster: Cluster, name: str, exit_after: float, timeout: float) -> dict[str, float]:
    """One new run under load: created -> its pod; then the pod runs, is preempted, and is replaced."""
    kube, recorder = cluster.kube, cluster.recorder
    kube.create(run_manifest(name))
    recorder.wait(lambda: f"{name}-1" in recorder.pods, timeout, f"pod {name}-1")
    start_pod(kube, f"{name}-1")
    recorder.wait(lambda: recorder.phases.get(name) == "Running", timeout, f"run {name} Running")
    preempt_pod(kube, f"{name}-1", exit_after)
    recorder.wait(lambda: f"{name}-2" in recorder.pods, timeout, f"pod {name}-2")
    pods, run = recorder.pods, recorder.runs[name]
    return {"created": pods[f"{name}-1"]["added"] - run["added"],
            "resumed": pods[f"{name}-2"]["added"] - pods[f"{name}-1"]["gone"]}


def bench_scale(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str]]:
    cluster = Cluster(workdir / "scale")
    kube, recorder, pid = cluster.kube, cluster.recorder, cluster.pid
    rows: list[tuple[str, str]] = []
    names = [f"run-{i:04d}" for i in range(args.runs)]
    n = len(names)
    try:
        idle = proc_status(pid)
        bench_rss0 = proc_status(os.getpid())
        op_cpu0, bench_cpu0 = cpu_seconds(pid), time.process_time()

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.create_threads) as pool:
            list(pool.map(lambda name: kube.create(run_manifest(name)), names))
        created = time.perf_counter()
        first_pods = [f"{name}-1" for name in names]
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
        ramp_op_cpu, ramp_bench_cpu = cpu_seconds(pid) - op_cpu0, time.process_time() - bench_cpu0
        ramp_requests = recorder.operator_requests(start, settled)
        pod_times = sorted(recorder.pods[p]["added"] for p in first_pods if p in recorder.pods)
        added = {name: recorder.runs[name]["added"] for name in names if "added" in recorder.runs.get(name, {})}
        reads = first_reads(recorder, added)
        to_pod = [recorder.pods[f"{name}-1"]["added"] - t for name, t in added.items() if f"{name}-1" in recorder.pods]
        to_read = [reads[name] - t for name, t in added.items() if name in reads]
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

        # the steady state: n idle runs (pods Pending for ever), each looked at once a minute by the safety net
        time.sleep(5.0)
        finalized_at_start = len(recorder.finalized)
        window_start, op_cpu1, bench_cpu1 = time.perf_counter(), cpu_seconds(pid), time.process_time()
        wall_start = time.time()
        time.sleep(args.idle_seconds)
        window_end, wall_end = time.perf_counter(), time.time()
        finalized_at_end = len(recorder.finalized)
        idle_op_cpu, idle_bench_cpu = cpu_seconds(pid) - op_cpu1, time.process_time() - bench_cpu1
        idle_requests = recorder.operator_requests(window_start, window_end)
        window = window_end - window_start

        # new runs under that load, a second apart: created -> pod; pod gone (preempted) -> next pod
        probe_names = [f"probe-{i}" for i in range(args.probes if not timed_out else 0)]
        with concurrent.futures.ThreadPoolExecutor(max(1, args.probes)) as pool:
            futures = []
            for name in probe_names:
                futures.append(pool.submit(probe, cluster, name, args.exit_after, args.scale_timeout))
                time.sleep(1.0)
            probes = []
            for future in futures:
                try:
                    probes.append(future.result())
                except TimeoutError as error:
                    rows.append((f"  probe failed: {error}", ""))
        probe_reads = first_reads(recorder, {name: recorder.runs[name]["added"] for name in probe_names
                                             if "added" in recorder.runs.get(name, {})})
        final, bench_final = proc_status(pid), proc_status(os.getpid())

        writes = [r for r in idle_requests if not r.method.endswith("GET")]
        reconciles = count(idle_requests, "GET", "trainingruns")
        rows[:0] = [(f"2. scale: {n} TrainingRuns created at once ({args.create_threads} client threads), "
                     "no kubelet (their pods stay Pending)", "")]
        if timed_out:
            rows.append((f"  TIMED OUT: {timed_out}; {len(pod_times)} of {n} first pods existed, "
                         f"{len(recorder.finalized)} runs had kopf's finalizer (probes skipped)", ""))
        rows += [
            ("all runs created (client side)", f"{created - start:7.2f} s  ({n / (created - start):.0f} creates/s)"),
            ("first pod created", f"{pod_times[0] - start:7.2f} s after the first create" if pod_times else "-"),
            ("half of the first pods exist", f"{pod_times[len(pod_times) // 2] - start:7.2f} s" if pod_times else "-"),
            ("every run has its first pod", f"{all_pods - start:7.2f} s  -> {len(pod_times) / (all_pods - start):.1f} runs/s"),
            ("every pod recorded in its run (podUID)", f"{settled - start:7.2f} s"),
            ("every run has kopf's finalizer", f"{all_finalized - start:7.2f} s  ({finalized_after_ramp} of {n} "
                                                           "when every pod was recorded)"),
            ("per run: run created -> its pod created", spread(to_pod, "s", 1.0)),
            ("per run: run created -> operator's first GET", spread(to_read, "s", 1.0)),
            ("operator requests during the ramp", f"{len(ramp_requests)} = {len(ramp_requests) / n:.1f} per run: "
                                                  + request_mix(ramp_requests)),
            ("operator CPU during the ramp", f"{ramp_op_cpu:.1f} s ({ramp_op_cpu / (settled - start):.2f} cores); "
                                             f"this process (emulator + client) {ramp_bench_cpu:.1f} s "
                                             f"({ramp_bench_cpu / (settled - start):.2f} cores)"),
            ("operator RSS idle / after the ramp / end", f"{idle.get('VmRSS', 0) / 1024:.0f} / "
                                                         f"{after_ramp.get('VmRSS', 0) / 1024:.0f} / "
                                                         f"{final.get('VmRSS', 0) / 1024:.0f} MiB"),
            ("operator peak RSS (VmHWM)", f"{final.get('VmHWM', 0) / 1024:.0f} MiB = idle + "
                                          f"{(final.get('VmHWM', 0) - idle.get('VmRSS', 0)) / n:.0f} kB per run; "
                                          f"{final.get('Threads', 0)} threads"),
            ("emulator (this process) RSS start / peak", f"{bench_rss0.get('VmRSS', 0) / 1024:.0f} / "
                                                         f"{bench_final.get('VmHWM', 0) / 1024:.0f} MiB"),
            (f"steady state: {n} idle runs, {window:.0f} s window", ""),
            ("operator requests/s", f"{len(idle_requests) / window:.1f} = {len(idle_requests) / window / n * 10:.2f} "
                                    f"per run per 10 s: " + request_mix(idle_requests)),
            ("  reconciles/s (GETs of a run)", f"{reconciles / window:.1f} (one per run per 60 s would be {n / 60:.1f}/s)"),
            ("  handler calls/s (operator log)", ", ".join(f"{name} {calls / window:.1f}" for name, calls in
                                                            cluster.handler_calls(wall_start, wall_end).most_common())),
            ("  runs with kopf's finalizer", f"{finalized_at_start} at the window's start, {finalized_at_end} at its end"),
            ("  writes that changed nothing", f"{sum(1 for r in writes if not r.wrote)} of {len(writes)}"),
            ("  emulator time per request", spread([r.duration for r in idle_requests])),
            ("operator CPU", f"{idle_op_cpu / window:.2f} cores" + (
                f" = {1000 * idle_op_cpu / reconciles:.1f} ms per reconcile" if reconciles else "")),
            ("emulator CPU (this process)", f"{idle_bench_cpu / window:.2f} cores = "
                                            f"{1000 * idle_bench_cpu / max(1, len(idle_requests)):.1f} ms per request"),
            (f"{len(probes)} new runs under this load, 1 s apart", ""),
            ("run created -> operator's first GET", spread([probe_reads[p] - recorder.runs[p]["added"]
                                                            for p in probe_reads], "s", 1.0)),
            ("run created -> its pod created", spread([p["created"] for p in probes], "s", 1.0)),
            ("its pod preempted: old pod gone -> next pod", spread([p["resumed"] for p in probes], "s", 1.0)),
        ]
        rows += [(line, "") for line in cluster.log_summary()]
    finally:
        cluster.close()
    rows.append((f"  {cluster.stopped}", ""))
    return rows


def count(requests: list[Request], method: str, plural: str, subresource: str | None = None) -> int:
    return sum(1 for r in requests if r.method.endswith(method) and r.plural == plural and r.subresource == subresource)


def request_mix(requests: list[Request]) -> str:
    """Counts by verb and resource, with the answers that were not 2xx."""
    def kind(r: Request) -> str:
        return (f"{r.method.rsplit('.', 1)[-1]} {r.plural}{'/' + r.subresource if r.subresource else ''}"
                f"{'' if r.name or r.method.endswith('POST') else ' (list)'}")
    mix, errors = Counter(kind(r) for r in requests), Counter((kind(r), r.status) for r in requests if r.status >= 300)
    return ", ".join(f"{k} {number}" + "".join(f" ({status}: {errors[k, status]})" for kk, status in sorted(errors)
                                                 if kk == k) for k, number in mix.most_common())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preemptions", type=int, default=20, help="runs preempted in the resume-latency part (0: skip)")
    parser.add_argument("--kubelet", choices=("scripted", "harness"), default="scripted",
                        help="who plays the kubelet in part 1 (default: the benchmark's scripted writes)")
    parser.add_argument("--exit-after", type=float, default=0.5,
                        help="scripted kubelet: seconds from the preemption to the container's exit")
    parser.add_argument("--gap", type=float, default=0.3, help="pause between isolated preemptions (s)")
    parser.add_argument("--runs", type=int, default=1000, help="TrainingRuns created at once in the scale part (0: skip)")
    parser.add_argument("--create-threads", type=int, default=8, help="client threads creating the runs")
    parser.add_argument("--scale-timeout", type=float, default=300.0, help="give up waiting for the pods after (s)")
    parser.add_argument("--idle-seconds", type=float, default=75.0,
                        help="steady-state window (s); longer than the operator's 60 s safety net")
    parser.add_argument("--probes", type=int, default=5, help="single runs created under the steady-state load")
    parser.add_argument("--keep-request-log", action="store_true",
                        help="leave kmock's request log unbounded (its reads then slow down with every request)")
    args = parser.parse_args(argv)
    global KEEP_REQUEST_LOG
    KEEP_REQUEST_LOG = args.keep_request_log

    total_start = time.perf_counter()
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, python {platform.python_version()}, "
          f"kopf {version('kopf')}, kubernetes client {version('kubernetes')}, kmock {version('kmock')}", flush=True)
    print(f"operator code: {code_state()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="kontinue-bench-operator-"))
    rows: list[tuple[str, str]] = []
    try:
        if args.preemptions:
            rows += bench_resume(args, workdir)
            print_table(rows)
            print(flush=True)
        if args.runs:
            scale = bench_scale(args, workdir)
            print_table(scale)
    finally:
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
