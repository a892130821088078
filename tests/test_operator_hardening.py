"""The operator's hardening on the real API server: a spec fixed once the run started (CEL
transition rules for what the API server can see, the spec digest for the rest), specs that turn
invalid mid-run, the image allow-list, status writes against the resourceVersion and NaN in the
trainer's report, a run re-created under the name of one whose pod is still stopping, and a fuzz
of broken manifests through the API server and the operator.

Pods run a sleeper (tests.operator_helpers.SLEEPER and variants) instead of the trainer: none of
this is about training.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import random
import re
import sys
import textwrap
import threading
import time

import pytest

from kontinue.operator.pods import run_label
from tests.kube_fixtures import RUN_LABEL, ApiError
from tests.operator_helpers import OPERATOR_ARGS, SLEEPER, pod_lifetimes, run_status, transition_reasons
from tests.trainer_fixtures import training_run

# Stops like a trainer saving a resume point: SIGTERM takes 3 s, then exit 143.
GRACEFUL_SLEEPER = [sys.executable, "-c", textwrap.dedent("""
    import signal, sys, time
    def stop(*_):
        print("stopping", flush=True)
        time.sleep(3)
        print("stopped", flush=True)
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    print("sleeping", flush=True)
    time.sleep(600)
""")]


def conditions_of(status: dict) -> dict[str, dict]:
    return {condition["type"]: condition for condition in status.get("conditions") or []}


def sleeper_run(kube, kubelet, name: str, **spec) -> dict:
    """A valid TrainingRun checkpointing onto a claim (/runs, which also holds the paths of its
    data: they need not exist, its pods run a sleeper: `command`, SLEEPER by default). Without a
    kubelet there is no claim and no process: the run's pods only exist."""
    if kubelet is not None:
        kubelet.claim_dir("runs")
        kubelet.override_command(name, spec.pop("command", SLEEPER))
    data = {"train": "/runs/data/train.parquet", "validation": "/runs/data/validation.parquet"}
    manifest = training_run(name, "/runs", data, "/runs/models/tiny-bert",
                            volumes=[{"name": "runs", "claimName": "runs", "mountPath": "/runs"}], **spec)
    manifest["metadata"]["namespace"] = kube.namespace
    return manifest


def pods_of(kube, run: str) -> list[dict]:
    return kube.list("pods", kube.namespace, labels={RUN_LABEL: run})


def wait_running(kube, name: str, pod: str | None = None, timeout: float = 60) -> dict:
    pod = pod or f"{name}-1"
    kube.wait_for(lambda: run_status(kube, name).get("phase") == "Running"
                  and run_status(kube, name).get("currentPod") == pod, timeout, f"{pod} of {name} to run")
    return run_status(kube, name)


def wait_failed(kube, name: str, timeout: float = 60) -> dict:
    kube.wait_for(lambda: run_status(kube, name).get("phase") == "Failed", timeout, f"run {name} to fail")
    return run_status(kube, name)


def assert_operator_healthy(operator_process) -> None:
    logs = operator_process.logs()
    assert operator_process.running, logs[-3000:]
    assert "Traceback" not in logs, logs[-5000:]


# -- identity: a run re-created under the name of one whose pod is still stopping -----------------

def test_a_run_recreated_while_the_old_runs_pod_stops_waits_for_it_and_never_adopts_it(
        kube, kubelet, operator_process):
    """The old run is at attempt 2 (pod same-2), so the new run's first pod (same-1) has another
    name: only the wait keeps two trainers off one run directory."""
    operator_process.start(*OPERATOR_ARGS)
    manifest = sleeper_run(kube, kubelet, "same", command=GRACEFUL_SLEEPER)
    old_uid = kube.create(manifest)["metadata"]["uid"]
    wait_running(kube, "same")
    kubelet.preempt("same-1")
    wait_running(kube, "same", "same-2")
    old_pod = kube.get("pods", kube.namespace, "same-2")["metadata"]["uid"]

    kube.delete("trainingruns", kube.namespace, "same")
    kube.wait_for(lambda: kube.get("trainingruns", kube.namespace, "same") is None, 30, "the old run to go")
    new_uid = kube.create(manifest)["metadata"]["uid"]
    assert new_uid != old_uid
    # The garbage collector deletes same-2 (which takes 3 s to stop), unless it does not watch a CRD
    # this young yet (it looks for new resources every 30 s): then it is still there until this does.
    time.sleep(1)
    kube.delete("pods", kube.namespace, "same-2", uid=old_pod)
    kubelet.wait_gone("same-2", uid=old_pod, timeout=30)
    status = wait_running(kube, "same")
    assert (status["attempt"], status.get("preemptions", 0), status.get("failures", 0)) == (1, 0, 0), status

    # pod_lifetimes asserts that no two pods labelled with the run ever existed at once
    assert [name for name, _, _ in pod_lifetimes(kube, "same")] == ["same-1", "same-2", "same-1"]
    assert kubelet.started == ["same-1", "same-2", "same-1"]
    new_pod = kube.get("pods", kube.namespace, "same-1")
    assert [ref["uid"] for ref in new_pod["metadata"]["ownerReferences"]] == [new_uid]
    versions = [v for v in kube.history("trainingruns", kube.namespace, "same")
                if v and v["metadata"]["uid"] == new_uid]
    assert all((v.get("status") or {}).get("currentPod") in (None, "same-1") for v in versions), \
        "the new run never took the old run's pod for its own"
    messages = [(v.get("status") or {}).get("message") or "" for v in versions]
    assert ("waiting to start: pod same-2 of an earlier run named same is still stopping; two trainers must never "
            "write one run directory") in messages, messages
    assert_operator_healthy(operator_process)


# -- a spec fixed once the run started -----------------------------------------------------------

IMMUTABLE_EDITS = [("spec.seed", {"seed": 8}), ("spec.resources.gpus", {"resources": {"gpus": 1}}),
                   ("spec.checkpoint.storage", {"checkpoint": {"storage": "/runs/elsewhere"}}),
                   ("spec.task", {"task": {"label": "other"}})]


def test_a_started_runs_spec_is_fixed_and_safe_edits_take_effect(kube, kubelet, operator_process):
    # Before the first attempt (no operator yet) every field may change.
    early = kube.create(sleeper_run(kube, kubelet, "early"))
    for _, edit in IMMUTABLE_EDITS:
        kube.patch("trainingruns", kube.namespace, "early", {"spec": edit})
    spec = kube.get("trainingruns", kube.namespace, "early")["spec"]
    assert (spec["seed"], spec["resources"]["gpus"], spec["checkpoint"]["storage"], spec["task"]["label"]) == \
        (8, 1, "/runs/elsewhere", "other")
    assert early["metadata"]["generation"] == 1

    operator_process.start(*OPERATOR_ARGS)
    kube.create(sleeper_run(kube, kubelet, "imm"))
    kube.create(sleeper_run(kube, kubelet, "hp"))
    for name in ("early", "imm", "hp"):
        wait_running(kube, name)

    # Once started, the API server refuses a change of each immutable field CEL sees, naming it.
    before = kube.get("trainingruns", kube.namespace, "imm")
    for field, edit in IMMUTABLE_EDITS:
        with pytest.raises(ApiError) as refused:
            kube.patch("trainingruns", kube.namespace, "imm", {"spec": edit})
        message = refused.value.body["message"]
        assert refused.value.status == 422, refused.value.body
        assert f"{field}: " in message and f"{field} is immutable once the run has started" in message, message
    after = kube.get("trainingruns", kube.namespace, "imm")
    assert after["spec"] == before["spec"] and after["metadata"]["generation"] == before["metadata"]["generation"]

    # Safe edits are taken mid-run and take effect: backoffLimit 0 makes the first failure final,
    # deleteRunDirectory has the run directory deleted with the run ...
    kube.patch("trainingruns", kube.namespace, "imm",
               {"spec": {"backoffLimit": 0, "maxPreemptions": 5, "deleteRunDirectory": True}})
    run_dir = kubelet.claim_dir("runs") / kube.namespace / "imm"
    run_dir.mkdir(parents=True)
    (run_dir / "status.json").write_text("{}")  # what a trainer would have left there
    kubelet.kill("imm-1", exit_code=1)
    status = wait_failed(kube, "imm")
    failed = conditions_of(status)["Failed"]
    assert failed["reason"] == "TrainerError" and "spec.backoffLimit is 0" in failed["message"], failed
    assert status["failures"] == 1 and status["attempt"] == 1, status
    kubelet.override_command("imm", None)  # the cleanup pod runs its own command
    # kopf adds its finalizer with a patch conditioned on the resourceVersion of the event it handles,
    # which the operator's own status writes of that cycle overtake: it lands only once a cycle writes
    # nothing, and a run deleted before that keeps its directory (a known gap, not this test's subject)
    kube.wait_for_object("trainingruns", kube.namespace, "imm",
                         lambda run: "kontinue.dev/finalizer" in (run["metadata"].get("finalizers") or []),
                         30, "the finalizer that deleteRunDirectory needs")
    kube.delete("trainingruns", kube.namespace, "imm")
    kube.wait_for(lambda: kube.get("trainingruns", kube.namespace, "imm") is None, 30, "imm to go")
    assert not any(path.is_file() for path in run_dir.rglob("*")), (sorted(run_dir.rglob("*")),
                                                                    transition_reasons(kube, "imm"))
    # ... and maxPreemptions 0 the first preemption.
    kube.patch("trainingruns", kube.namespace, "early", {"spec": {"maxPreemptions": 0}})
    kubelet.preempt("early-1")
    status = wait_failed(kube, "early")
    failed = conditions_of(status)["Failed"]
    assert failed["reason"] == "TooManyPreemptions" and "spec.maxPreemptions (0)" in failed["message"], failed

    # spec.hyperparameters is free-form, which CEL cannot see: the API server takes the edit and the
    # operator stops the run (its run directory holds the training of the old hyperparameters).
    kube.patch("trainingruns", kube.namespace, "hp", {"spec": {"hyperparameters": {"optim.lr": 0.002}}})
    status = wait_failed(kube, "hp")
    failed = conditions_of(status)["Failed"]
    assert failed["reason"] == "SpecChanged" and conditions_of(status)["Running"]["reason"] == "SpecChanged"
    assert status["message"] == failed["message"]
    assert failed["message"].startswith("spec.hyperparameters changed after the run started (attempt 1)"), failed
    assert "pod hp-1 is stopped" in failed["message"] and "create a new run" in failed["message"]
    kube.wait_for(lambda: pods_of(kube, "hp") == [] and "hp-1" not in kubelet.running_pods(), 30, "hp-1 to stop")
    time.sleep(3)  # a few back-off periods (1 s) and ticks (2 s): nothing starts again
    assert [name for name, _, _ in pod_lifetimes(kube, "hp")] == ["hp-1"]
    assert transition_reasons(kube, "hp") == ["AttemptStarted", "Running", "SpecChanged"]
    assert [e["type"] for e in kube.events(kube.namespace, "hp") if e["reason"] == "SpecChanged"] == ["Warning"]
    assert run_status(kube, "hp")["attempt"] == 1
    assert_operator_healthy(operator_process)


def test_a_spec_that_turns_invalid_mid_run_stops_its_gpu_pod(kube, kubelet, operator_process):
    operator_process.start(*OPERATOR_ARGS)
    kube.create(sleeper_run(kube, kubelet, "turns", resources={"gpus": 1}))
    wait_running(kube, "turns")
    pod = kube.get("pods", kube.namespace, "turns-1")
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # a typo in a hyperparameter: no schema can tell, the operator can
    kube.patch("trainingruns", kube.namespace, "turns", {"spec": {"hyperparameters": {"optim.lrr": 0.1}}})
    status = wait_failed(kube, "turns")
    failed = conditions_of(status)["Failed"]
    assert failed["reason"] == "InvalidSpec" and conditions_of(status)["Running"]["status"] == "False", failed
    assert "spec.hyperparameters.optim.lrr" in failed["message"], failed
    assert status.get("currentPod") is None, status
    kube.wait_for(lambda: pods_of(kube, "turns") == [] and "turns-1" not in kubelet.running_pods(), 30,
                  "the GPU pod to stop")
    time.sleep(3)
    assert [name for name, _, _ in pod_lifetimes(kube, "turns")] == ["turns-1"]
    assert kubelet.started == ["turns-1"]
    assert transition_reasons(kube, "turns") == ["AttemptStarted", "Running", "InvalidSpec"]
    assert_operator_healthy(operator_process)


# -- the image allow-list ------------------------------------------------------------------------

def test_only_allowed_images_ever_get_a_pod(kube, kubelet, operator_process):
    image = "example.org/team/trainer:2"
    operator_process.start(*OPERATOR_ARGS)
    kube.create(sleeper_run(kube, kubelet, "denied", image=image))
    status = wait_failed(kube, "denied")
    failed = conditions_of(status)["Failed"]
    assert failed["reason"] == "ImageNotAllowed", failed
    assert failed["message"] == (f"spec.image {image} is not allowed: this operator runs only images matching "
                                 "kontinue:test (its --allowed-images)")
    assert "attempt" not in status and transition_reasons(kube, "denied") == ["ImageNotAllowed"]

    operator_process.stop()
    operator_process.start(*OPERATOR_ARGS, "--allowed-images", "example.org/team/*")
    kube.create(sleeper_run(kube, kubelet, "allowed", image=image))
    wait_running(kube, "allowed")
    assert kube.get("pods", kube.namespace, "allowed-1")["spec"]["containers"][0]["image"] == image
    assert run_status(kube, "denied")["phase"] == "Failed", "a failed run stays failed"
    assert pod_lifetimes(kube, "denied") == [] and "denied-1" not in kubelet.started
    assert_operator_healthy(operator_process)


# -- status writes against the resourceVersion, and NaN in the trainer's report --------------------

# A trainer whose report holds a diverged loss (NaN) and an infinite score beside finite metrics,
# with a new resume point every 0.3 s (each tick has a status to write).
NAN_REPORTER = [sys.executable, "-c", textwrap.dedent("""
    import itertools, json, time
    for step in itertools.count(1):
        report = {"progress": 0.3, "step": step, "epoch": 0,
                  "lastCheckpoint": {"uri": f"/runs/resume/step-{step}.ckpt", "step": step},
                  "metrics": {"val_acc": 0.5, "val_loss": float("nan"), "val_f1": float("inf")}}
        print("kontinue-status: " + json.dumps(report), flush=True)  # NaN and Infinity: not JSON
        time.sleep(0.3)
""")]


def test_status_written_from_outside_meanwhile_neither_loses_nor_doubles_counts_and_nan_never_fails_a_write(
        kube, kubelet, operator_process):
    operator_process.start(*OPERATOR_ARGS[:-3], "1", *OPERATOR_ARGS[-2:])  # ticks every second
    kube.create(sleeper_run(kube, kubelet, "busy"))
    wait_running(kube, "busy")

    stop, written, errors = threading.Event(), [], []

    def other_writer() -> None:  # another controller bumping a status field the operator leaves alone
        while not stop.is_set():
            try:
                kube.patch("trainingruns", kube.namespace, "busy",
                           {"status": {"dumpedModelUri": f"s3://elsewhere/{len(written)}"}}, subresource="status")
                written.append(1)
            except ApiError as error:
                errors.append(error)
            stop.wait(0.1)

    writer = threading.Thread(target=other_writer, daemon=True)
    writer.start()
    try:
        time.sleep(2)
        kubelet.preempt("busy-1")
        wait_running(kube, "busy", "busy-2")
        kubelet.override_command("busy", NAN_REPORTER)
        time.sleep(1)
        kubelet.kill("busy-2", exit_code=1)  # a crash: counted as a failure, retried after 1 s
        wait_running(kube, "busy", "busy-3")
        kube.wait_for(lambda: run_status(kube, "busy").get("metrics"), 30, "the trainer's report in the status")
        time.sleep(3)  # more ticks (1 s) reading newer reports, while the other writer goes on
    finally:
        stop.set()
        writer.join(10)
    assert not errors and len(written) > 20, (errors, len(written))

    status = run_status(kube, "busy")
    assert (status["attempt"], status["preemptions"], status["failures"]) == (3, 1, 1), status
    assert status["dumpedModelUri"].startswith("s3://elsewhere/"), "the other writer's field is left alone"
    assert status["metrics"] == {"val_acc": 0.5}, status
    assert status["progress"] == "30%" and status["lastCheckpoint"]["step"] >= 1, status
    assert "metric val_loss is NaN (JSON cannot carry it: left out of the status)" in status["warnings"], status
    assert "metric val_f1 is inf (JSON cannot carry it: left out of the status)" in status["warnings"], status
    history = [(v.get("status") or {}) for v in kube.history("trainingruns", kube.namespace, "busy") if v]
    assert [s.get("preemptions", 0) for s in history] == sorted(s.get("preemptions", 0) for s in history)
    assert max(s.get("failures", 0) for s in history) == 1 and max(s.get("attempt", 0) for s in history) == 3
    assert transition_reasons(kube, "busy") == ["AttemptStarted", "Running", "Preempted",
                                                "AttemptStarted", "Running", "AttemptFailed",
                                                "AttemptStarted", "Running"]
    assert [name for name, _, _ in pod_lifetimes(kube, "busy")] == ["busy-1", "busy-2", "busy-3"]
    logs = operator_process.logs()
    assert "deciding again from a fresh read" in logs, "the other writer never overtook a decision"
    for refusal in ("(400)", "(422)", "Bad Request", "Unprocessable Entity", "Traceback"):
        assert refusal not in logs, logs[-5000:]
    assert operator_process.running


# -- the pure decisions behind the fixes: an earlier namesake's pods, names too long ------------------

def test_no_attempt_starts_while_a_pod_of_an_earlier_run_of_the_name_is_there():
    from kontinue.operator.reconcile import decide, split_pods
    from tests.test_operator_decisions import NOW, SETTINGS, apply, pod_state, run_body

    body = run_body()  # uid-1
    mine = pod_state(name="sst-1")
    mine["metadata"]["ownerReferences"] = [{"kind": "TrainingRun", "name": "sst", "uid": "uid-1"}]
    old = pod_state(name="sst-2", deleting=True)
    old["metadata"]["ownerReferences"] = [{"kind": "TrainingRun", "name": "sst", "uid": "uid-0"}]
    orphan = pod_state(name="sst-3")
    assert split_pods(body, [mine, old, orphan]) == ([mine], [old, orphan])

    plan = decide(body, [], NOW, SETTINGS, earlier=[old])
    assert plan.create is None and "attempt" not in plan.status and not plan.events
    message = ("waiting to start: pod sst-2 of an earlier run named sst is still stopping; two trainers must never "
               "write one run directory")
    assert plan.status["phase"] == "Pending" and plan.status["message"] == message
    running = next(c for c in plan.status["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "WaitingForEarlierPod")
    assert plan.requeue_after == 2.0
    waiting = apply(body, plan)
    again = decide(waiting, [], NOW, SETTINGS, earlier=[old])
    assert again.status == {} and again.create is None and again.requeue_after == 2.0, "said once"
    # one not being deleted (the garbage collector is not there yet, or it was orphaned)
    assert "sst-3 of an earlier run named sst is still there (delete it if nothing will)" in \
        decide(body, [], NOW, SETTINGS, earlier=[orphan]).status["message"]
    # gone: attempt 1 starts
    plan = decide(waiting, [], NOW, SETTINGS, earlier=[])
    assert plan.create["metadata"]["name"] == "sst-1" and plan.status["attempt"] == 1
    # between attempts as well
    between = apply(waiting, plan)
    between["status"].update(currentPod=None, phase="Preempted", preemptions=1)
    assert decide(between, [], NOW, SETTINGS, earlier=[old]).create is None
    assert decide(between, [], NOW, SETTINGS).create["metadata"]["name"] == "sst-2"


def test_a_run_name_too_long_for_its_pods_and_events_is_an_invalid_spec():
    from kontinue.api.manifests import parse_training_run
    from kontinue.operator.pods import MAX_RUN_NAME, pod_problems
    from kontinue.operator.reconcile import decide
    from tests.test_operator_decisions import NOW, SETTINGS, run_body

    assert MAX_RUN_NAME == 236  # <name>.<16 hex digits>, an event's name, is the longest
    body = run_body()
    body["metadata"]["name"] = "n" * MAX_RUN_NAME
    assert pod_problems(parse_training_run(body)) == []
    body["metadata"]["name"] += "n"
    [problem] = pod_problems(parse_training_run(body))
    assert problem.path == "metadata.name" and problem.message.startswith("237 characters: at most 236")
    plan = decide(body, [], NOW, SETTINGS)
    assert plan.create is None and plan.status["phase"] == "Failed"
    assert "metadata.name: 237 characters: at most 236" in plan.status["message"]


# -- fuzz: broken manifests through the API server and the operator -----------------------------------

FUZZ_SEED, FUZZ_COUNT = 20261130, 300
ABSENT = object()
DEEP = "__kontinue_fuzz_deep__"  # replaced in the request's JSON text by hyperparameters nested this deep
# Optional fields the valid manifest leaves out: a mutation may set them (to something broken).
OPTIONAL_PATHS = [("metadata", "labels", "team"), ("metadata", "annotations", "note"), ("spec", "image"),
                  ("spec", "timeLimit"), ("spec", "resources"), ("spec", "resources", "gpus"),
                  ("spec", "resources", "cpu"), ("spec", "resources", "nodeSelector"),
                  ("spec", "resources", "tolerations"), ("spec", "task", "problemType"),
                  ("spec", "task", "columnTypes"), ("spec", "continueFrom"), ("spec", "maxPreemptions"),
                  ("spec", "backoffLimit"), ("spec", "deleteRunDirectory"), ("spec", "dumpModel"),
                  ("spec", "model", "hfText", "maxTextLen"), ("spec", "checkpoint", "intervalMinutes"),
                  ("spec", "checkpoint", "secretRef"), ("spec", "volumes", 0, "subPath")]
# A field path in a refusal: spec.x, spec[0], "spec:", metadata.x, or the API server's ObjectMeta
FIELD = re.compile(r"\b(spec|metadata)(\.\w|\[|:)|\bObjectMeta\b")


def _paths(node, prefix=()) -> list[tuple]:
    found = [prefix] if prefix else []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        found += _paths(child, (*prefix, key))
    return found


def _wrong_type(value):
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (int, float)):
        return "seven"
    if isinstance(value, str):
        return 12345
    if isinstance(value, list):
        return {"not": "a list"}
    return "not an object"


def _nested(depth: int) -> dict:
    return {"optim.lr": 0.001, "nested": DEEP, "depth": depth}


MUTATIONS = {
    "wrong type": lambda value, rng: _wrong_type(None if value is ABSENT else value),
    "huge int": lambda value, rng: 10**30,
    "negative": lambda value, rng: rng.choice([-1, -10**12]),
    "float": lambda value, rng: 2.5,
    "empty string": lambda value, rng: "",
    "unicode": lambda value, rng: rng.choice(["ünïcødé", "名前", "😀-run", "run\u200b", "Ω"]),
    "100 KB string": lambda value, rng: "x" * 100_000,
    "missing": lambda value, rng: ABSENT,
    "null": lambda value, rng: None,
    "unknown field": lambda value, rng: {**value, "bogusField": 1} if isinstance(value, dict) else {"bogusField": 1},
    "list for object": lambda value, rng: [None if value is ABSENT else value],
    "empty object": lambda value, rng: {},
    "deep hyperparameters": lambda value, rng: _nested(rng.choice([30, 200, 2000])),
}


def _set(manifest: dict, path: tuple, value) -> None:
    node = manifest
    for key in path[:-1]:
        if isinstance(node, dict):
            if not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
        else:
            node = node[key]
    if value is ABSENT:
        if isinstance(node, dict):
            node.pop(path[-1], None)
        else:
            del node[path[-1]]
    else:
        node[path[-1]] = value


def _get(manifest: dict, path: tuple):
    node = manifest
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return ABSENT
    return node


def fuzzed_manifests(base: dict, count: int, seed: int) -> list[tuple[str, dict]]:
    """(what was broken, manifest) for `count` mutations of `base`, one broken field each."""
    rng = random.Random(seed)
    paths = _paths({"metadata": {k: v for k, v in base["metadata"].items() if k != "namespace"},
                    "spec": base["spec"]}) + OPTIONAL_PATHS
    out = []
    for index in range(count):
        name = f"fz-{index:03d}"
        manifest = copy.deepcopy(base)
        manifest["metadata"]["name"] = name
        kind = rng.choice(sorted(MUTATIONS))
        path = ("spec", "hyperparameters") if kind == "deep hyperparameters" else rng.choice(paths)
        value = MUTATIONS[kind](_get(manifest, path), rng)
        _set(manifest, path, value)
        out.append((f"{'.'.join(map(str, path))}: {kind}", manifest))
    return out


def edge_cases(base: dict) -> list[tuple[str, dict]]:
    """Cases a random draw is unlikely to hit: the longest names the API server takes, hyperparameters
    nested as deep as it stores (Python's json stops at 1,000 by default), every optional field null."""
    cases = []
    for length in (253, 240, 236):
        manifest = copy.deepcopy(base)
        manifest["metadata"]["name"] = "n" * length
        cases.append((f"metadata.name: {length} characters", manifest))
    manifest = copy.deepcopy(base)
    manifest["metadata"]["name"] = "deepest"
    manifest["spec"]["hyperparameters"] = _nested(9_990)
    cases.append(("spec.hyperparameters: nested 9,990 deep", manifest))
    manifest = copy.deepcopy(base)
    manifest["metadata"]["name"] = "nulls"
    for path in OPTIONAL_PATHS:
        if path[0] == "spec" and path[-1] != "subPath" and not any(path[:n] in OPTIONAL_PATHS for n in (2, 3)):
            _set(manifest, path, None)
    cases.append(("every optional spec field null", manifest))
    return cases


def _request_body(manifest: dict) -> str:
    text = json.dumps(manifest)
    spec = manifest.get("spec")
    hyperparameters = spec.get("hyperparameters") if isinstance(spec, dict) else None
    if isinstance(hyperparameters, dict) and hyperparameters.get("nested") == DEEP:
        depth = hyperparameters["depth"]
        text = text.replace(json.dumps(DEEP), '{"a": ' * depth + "1" + "}" * depth)
    return text


def _create_raw(kube, manifest: dict) -> tuple[int, dict]:
    """POSTs the manifest (as text: nesting json.dumps would not write); (status code, body)."""
    response = kube._session().post(
        kube.url + kube.path("trainingruns", kube.namespace), data=_request_body(manifest),
        headers={"Content-Type": "application/json"}, verify=str(kube.plane.ca), timeout=60)
    if response.status_code == 201:  # what was created may be nested too deep for Python's json
        return 201, {"metadata": {"name": manifest["metadata"]["name"]}}
    try:
        return response.status_code, response.json()
    except (ValueError, RecursionError):
        return response.status_code, {"message": response.text[:2000]}


@pytest.fixture
def deep_json():
    """Python's json as deep as the API server's (10,000 levels), for this process to read back what
    the fuzz stores (the harness's own watches included)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 40_000))
    yield
    sys.setrecursionlimit(limit)


def test_fuzzed_manifests_are_refused_naming_the_field_or_judged_by_an_operator_that_never_stalls(
        kube, operator_process, deep_json):
    """A few hundred manifests, each a valid TrainingRun with one field broken, created 8 at a time
    while one operator runs: the API server refuses a broken one naming the field, the operator
    judges every one it took (no kubelet: pods need only exist), and neither ever stalls."""
    operator_process.start("--metrics-port", "0", "--health-port", "0", "--image", "kontinue:test",
                           "--grace-seconds", "30", "--progress-seconds", "10", "--backoff-seconds", "1")
    base = sleeper_run(kube, None, "fz")
    edges = edge_cases(base)
    cases = fuzzed_manifests(base, FUZZ_COUNT, FUZZ_SEED) + edges
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda case: _create_raw(kube, case[1]), cases))
    accepted: dict[str, str] = {}
    for (what, _), (code, body) in zip(cases, results):
        if code == 201:
            accepted[body["metadata"]["name"]] = what
            continue
        message = body.get("message") or ""
        assert code in (400, 422), (what, code, message[:500])
        # the field, as the CRD's schema and rules name it; metadata is decoded into the API
        # server's own type, whose decoding errors name it so (ObjectMeta.labels)
        assert FIELD.search(message), (what, code, message[:500])
    assert 40 <= len(accepted) <= len(cases) - 100, f"{len(accepted)} of {len(cases)} accepted: a poor mix"

    def verdicts() -> dict[str, dict]:
        return {run["metadata"]["name"]: run.get("status") or {}
                for run in kube.list("trainingruns", kube.namespace) if run["metadata"]["name"] in accepted}

    def judged() -> dict[str, dict] | None:
        statuses = verdicts()
        pending = [name for name in accepted if not (statuses.get(name, {}).get("phase") and any(
            c.get("reason") for c in statuses[name].get("conditions") or []))]
        return statuses if not pending else None
    statuses = kube.wait_for(judged, 60, "a verdict on every run the API server took", interval=1)

    for name, status in statuses.items():
        what, conditions = accepted[name], conditions_of(status)
        assert status["phase"] in ("Pending", "Failed"), (what, status)
        if status["phase"] == "Failed":  # the operator's own verdict, naming the field
            failed = conditions["Failed"]
            assert failed["reason"] in ("InvalidSpec", "ImageNotAllowed"), (what, failed)
            assert FIELD.search(failed["message"]), (what, failed["message"][:500])
            assert "attempt" not in status and pods_of(kube, run_label(name)) == [], (what, status)
        else:  # valid as far as anyone can tell before the trainer runs: its pod waits for a node
            assert conditions["Running"]["reason"] in ("PodPending", "Unschedulable"), (what, status)
            assert kube.get("pods", kube.namespace, status["currentPod"]) is not None, (what, status)
    edge = {what: statuses[name] for name, what in accepted.items() if what in dict(edges)}
    deepest = conditions_of(edge["spec.hyperparameters: nested 9,990 deep"])["Failed"]
    assert "spec.hyperparameters.nested" in deepest["message"], deepest["message"][:500]
    for length, phase in ((253, "Failed"), (240, "Failed"), (236, "Pending")):
        assert edge[f"metadata.name: {length} characters"]["phase"] == phase, edge
    assert "metadata.name: 240 characters: at most 236" in \
        edge["metadata.name: 240 characters"]["message"], edge["metadata.name: 240 characters"]["message"]

    # The operator took all of it in its stride, and still starts a fresh run at once.
    assert_operator_healthy(operator_process)
    kube.create(sleeper_run(kube, None, "after-fuzz"))
    kube.wait_for(lambda: kube.get("pods", kube.namespace, "after-fuzz-1"), 30, "the pod of a run after the fuzz")
    assert_operator_healthy(operator_process)

