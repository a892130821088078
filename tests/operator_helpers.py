"""What the operator's end-to-end tests share: the operator's flags, an uninterrupted reference
run, training data on a claim, reading a run's status, events and trainer status, preempting
after a checkpoint, and checks over the API server's journal (every write, in order)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.kube_fixtures import RUN_LABEL
from tests.trainer_fixtures import Trainer, training_run

OPERATOR_ARGS = ("--metrics-port", "0", "--health-port", "0", "--image", "kontinue:test",
                 "--grace-seconds", "30", "--progress-seconds", "2", "--backoff-seconds", "1")
# A container that runs until it is stopped (SIGTERM kills it: exit code 143).
SLEEPER = [sys.executable, "-c", "import time; print('sleeping', flush=True); time.sleep(600)"]


@pytest.fixture(scope="session")
def reference_state(tmp_path_factory, tiny_bert, review_tables) -> str:
    """finalState.sha256 of the run `training_run("e2e", ...)`, uninterrupted, by `kontinue train` alone."""
    workdir = tmp_path_factory.mktemp("operator-reference")
    manifest = training_run("e2e", str(workdir / "store"), review_tables, tiny_bert)
    attempt = Trainer(workdir).attempt(manifest, str(workdir / "store" / "tests" / "e2e"))
    assert attempt.exit_code == 0, attempt.output[-3000:]
    return json.loads((workdir / "store" / "tests" / "e2e" / "status.json").read_text())["finalState"]["sha256"]


def tables_on_claim(kubelet, review_tables: dict[str, str], claim: str = "reviews") -> tuple[dict[str, str], dict]:
    """Copies the review tables into a PersistentVolumeClaim: spec.data for them (the paths in the
    pod) and the spec.volumes entry that mounts the claim, read-only, at /data."""
    directory = kubelet.claim_dir(claim)
    directory.mkdir(parents=True, exist_ok=True)
    for table in review_tables.values():
        shutil.copy(table, directory)
    data = {name: f"/data/{Path(table).name}" for name, table in review_tables.items()}
    return data, {"name": "data", "claimName": claim, "mountPath": "/data", "readOnly": True}


def run_status(kube, name: str = "e2e") -> dict:
    return (kube.get("trainingruns", kube.namespace, name) or {}).get("status") or {}


def transition_reasons(kube, name: str = "e2e") -> list[str]:
    return [event["reason"] for event in kube.events(kube.namespace, name)]


def local_trainer_status(run_dir: Path) -> Callable[[], dict]:
    """Reads the trainer's status.json of a run directory on this machine ({} until written)."""
    def read() -> dict:
        try:
            return json.loads((run_dir / "status.json").read_text())
        except (OSError, ValueError):
            return {}
    return read


def preempt_after_checkpoint(kube, kubelet, trainer_status, step: int, name: str = "e2e") -> str:
    """Once the trainer has a resume point at `step` or later, evict its pod through the Eviction
    API (what `kubectl drain` and node autoscalers use) and wait until it is gone."""
    kube.wait_for(lambda: (trainer_status().get("lastCheckpoint") or {}).get("step", -1) >= step
                  and run_status(kube, name).get("phase") == "Running", 120, f"a checkpoint at step {step}")
    pod = run_status(kube, name)["currentPod"]
    kube.evict(pod)
    kubelet.wait_gone(pod, timeout=60)
    return pod


def pod_lifetimes(kube, run: str) -> list[tuple[str, int, int | None]]:
    """(pod name, resourceVersion created, resourceVersion removed or None) of every pod of a run,
    from the journal of writes (watches), and asserts that no two ever existed at once."""
    alive: dict[str, tuple[str, int]] = {}
    lives = []
    for rv, resource, event in kube.writes():
        meta = event["object"]["metadata"]
        if resource != "pods" or (meta.get("labels") or {}).get(RUN_LABEL) != run:
            continue
        if event["type"] == "ADDED":
            assert not alive, f"pod {meta['name']} was created while {sorted(alive)} still existed"
            alive[meta["uid"]] = (meta["name"], rv)
        elif event["type"] == "DELETED":
            name, born = alive.pop(meta["uid"])
            lives.append((name, born, rv))
    lives += [(name, born, None) for name, born in alive.values()]
    return sorted(lives, key=lambda life: life[1])


def assert_one_pod_at_a_time(kube, kubelet, run: str, expected: list[str]) -> None:
    """Exactly the `expected` pods existed, one after the other, and each process started once."""
    assert [name for name, _, _ in pod_lifetimes(kube, run)] == expected
    started = [name for name in kubelet.started if name.rpartition("-")[0] == run]
    assert started == expected, f"trainer processes started: {kubelet.started}"
