"""The shipped manifests meet a real API server (etcd, kube-apiserver, controller manager and scheduler
v1.36.2; no kubelet, so pods stay Pending): `kubectl apply -f crds/ -f deploy/operator.yaml` and
`helm install` work in one go on a fresh cluster, the operator then runs as a local process with
exactly the rights they grant (its ServiceAccount's token), trainer and cleanup pods pass PodSecurity
"restricted", kubectl shows the runs as documented, and the chart's `namespaces` confine the
operator's rights to them.

Each class starts its own fresh control plane and stops it at the end.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import kopf
import pytest
import requests
import yaml
from kubernetes import config as kube_config

from kontinue.api.manifests import parse_resource
from kontinue.operator import peering
from kontinue.operator.pods import build_cleanup_pod
from tests import control_plane
from tests.control_plane import ADMIN_TOKEN, ControlPlane, kubeconfig
from tests.tools import run_helm, run_kubectl

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "kontinue"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}
TRAINER_IMAGE = "registry.example/kontinue:test"


def binaries() -> Path:
    found = control_plane.assets()
    if found is None:
        pytest.skip(control_plane.HOW_TO_GET_THEM)
    return found


@pytest.fixture(scope="class")
def plane(tmp_path_factory):
    cluster = ControlPlane(tmp_path_factory.mktemp("control-plane"), binaries()).start()
    try:
        yield cluster
    finally:
        # a throwaway cluster: kube-apiserver's graceful shutdown would take ControlPlane.stop()'s
        # full 15 s; nothing here needs it
        for process in cluster.processes.values():
            if process.poll() is None:
                process.kill()
        cluster.stop()


# --- talking to the cluster -------------------------------------------------------------------

def api(plane: ControlPlane, method: str, path: str, body: dict | None = None, *, token: str = ADMIN_TOKEN,
        expect: tuple[int, ...] = (200, 201), content_type: str = "application/json") -> dict:
    response = requests.request(method, plane.url + path, data=None if body is None else json.dumps(body),
                                headers={"Authorization": f"Bearer {token}", "Content-Type": content_type},
                                verify=str(plane.ca), timeout=30)
    assert response.status_code in expect, f"{method} {path}: {response.status_code} {response.text}"
    return response.json() if response.content else {}


def namespace(plane: ControlPlane, name: str, labels: dict | None = None) -> None:
    api(plane, "POST", "/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}})


def service_account_kubeconfig(plane: ControlPlane, namespace: str, name: str, path: Path) -> tuple[Path, str]:
    """A kubeconfig with the ServiceAccount's token from the TokenRequest API (what its pod would get)."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {"expirationSeconds": 3600}}
    token_path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token"
    token = api(plane, "POST", token_path, request)["status"]["token"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(kubeconfig(plane.url, plane.ca, f"system:serviceaccount:{namespace}:{name}", token, "default"))
    return path, token


def training_run(name: str, namespace: str) -> dict:
    """A valid run; its data need not exist, since no pod of it will ever start."""
    return {
        "apiVersion": "kontinue.dev/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"task": {"label": "label", "problemType": "binary", "evalMetric": "acc"},
                 "data": {"train": "s3://datasets/reviews/train.parquet"},
                 "model": {"hfText": {"checkpoint": "s3://models/all-MiniLM-L6-v2"}},
                 "checkpoint": {"storage": "s3://kontinue-runs/checkpoints", "secretRef": {"name": "kontinue-s3"}}},
    }


def runs_path(namespace: str, name: str = "") -> str:
    return f"/apis/kontinue.dev/v1alpha1/namespaces/{namespace}/trainingruns" + (f"/{name}" if name else "")


def wait_for(what: str, check, timeout: float = 60.0, diagnose=lambda: "", give_up=lambda: None):
    """Polls `check` until it returns something true; `give_up` returning a reason fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        reason = give_up()
        if reason or time.monotonic() > deadline:
            raise AssertionError(f"{reason or f'timed out after {timeout:g}s'} waiting for {what}\n{diagnose()}")
        time.sleep(0.3)


FORBIDDEN = re.compile(r"forbidden|[( ]403[) ]", re.IGNORECASE)


class Operator:
    """`python -m kontinue ARGS` (the args of the shipped Deployment) as a local process."""

    def __init__(self, args: list[str], kubeconfig: Path, log: Path):
        self.log = log
        # never in-cluster, and only the shipped arguments (no KONTINUE_* settings of this machine)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERNETES_", "KONTINUE_"))}
        env.update(KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kontinue", *args, "--health-port", "0", "--metrics-port", "0"],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.output()


def deployment_args(manifests: list[dict]) -> list[str]:
    [deployment] = [d for d in manifests if d and d["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container["args"]


def operate(plane: ControlPlane, args: list[str], kubeconfig: Path, token: str, namespace: str, tmp: Path,
            peering_name: str) -> str:
    """Runs the operator on one new run in `namespace` and checks what it did: its trainer pod, the
    run's status and Event, a live peering; returns its log."""
    api(plane, "POST", runs_path(namespace), training_run("demo", namespace))
    operator = Operator(args, kubeconfig, tmp / "operator.log")
    try:
        def pod():
            found = requests.get(f"{plane.url}/api/v1/namespaces/{namespace}/pods/demo-1", verify=str(plane.ca),
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
            return found.json() if found.status_code == 200 else None

        def diagnose():
            return f"run: {api(plane, 'GET', runs_path(namespace, 'demo')).get('status')}\n" \
                   f"operator log:\n{operator.output()[-4000:]}\n{plane.dump()}"

        def refused():
            if operator.process.poll() is not None:
                return f"the operator exited {operator.process.returncode}"
            if FORBIDDEN.search(operator.output()):
                return "the operator was refused something"

        created = wait_for("the trainer pod demo-1", pod, 60, diagnose, refused)
        run = wait_for("status phase Pending with the pod", lambda: (
            lambda r: r if (r.get("status") or {}).get("currentPod") == "demo-1" else None)(
                api(plane, "GET", runs_path(namespace, "demo"))), 30, diagnose, refused)
        assert run["status"]["phase"] == "Pending" and run["status"]["attempt"] == 1, run["status"]
        assert [ref["uid"] for ref in created["metadata"]["ownerReferences"]] == [run["metadata"]["uid"]]
        def started():
            return [e for e in api(plane, "GET", f"/api/v1/namespaces/{namespace}/events")["items"]
                    if e["involvedObject"].get("uid") == run["metadata"]["uid"] and e["reason"] == "AttemptStarted"]

        events = wait_for("the AttemptStarted Event", started, 30, diagnose, refused)
        assert "created pod demo-1" in events[0]["message"]
        # peering is on, through the ClusterKopfPeering the operator created, with its keep-alive in it
        peers = wait_for("the operator's keep-alive", lambda: api(
            plane, "GET", f"/apis/kopf.dev/v1/clusterkopfpeerings/{peering_name}").get("status"), 10, diagnose, refused)
        assert [peer["priority"] for peer in peers.values()] == [100], peers
        # what the operator's own credentials can see: the pod it created, and no Secrets
        api(plane, "GET", f"/api/v1/namespaces/{namespace}/pods/demo-1", token=token)
        api(plane, "GET", f"/api/v1/namespaces/{namespace}/secrets", token=token, expect=(403,))
    finally:
        log = operator.stop()
    assert "created the ClusterKopfPeering" in log, log[-4000:]
    assert not FORBIDDEN.search(log), f"the operator was refused something:\n{log[-6000:]}"
    return log


def cleanup_pod_is_admitted(plane: ControlPlane, namespace: str, token: str) -> None:
    """The cleanup pod of a deleted run passes PodSecurity "restricted", created with the operator's rights."""
    body = api(plane, "GET", runs_path(namespace, "demo"))
    pod = build_cleanup_pod(body, parse_resource(body), image=TRAINER_IMAGE)
    created = api(plane, "POST", f"/api/v1/namespaces/{namespace}/pods", pod, token=token)
    assert created["metadata"]["name"] == "demo-cleanup"


def violating_pod_is_refused(plane: ControlPlane, namespace: str) -> None:
    """Sanity: the namespace does enforce "restricted" (as admin, who is not exempt)."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root"},
           "spec": {"containers": [{"name": "c", "image": TRAINER_IMAGE}]}}
    refused = requests.post(f"{plane.url}/api/v1/namespaces/{namespace}/pods", json=pod, verify=str(plane.ca),
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)
    assert refused.status_code == 403 and "violates PodSecurity" in refused.text, refused.text


# --- kubectl apply -f crds/ -f deploy/operator.yaml ----------------------------------------------

@pytest.fixture(scope="class")
def applied(plane):
    """The README's one command on a fresh cluster, first try."""
    first = run_kubectl("apply", "-f", str(ROOT / "crds"), "-f", str(ROOT / "deploy" / "operator.yaml"),
                        kubeconfig=plane.admin_kubeconfig, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    return first


class TestKubectlApply:
    def test_applies_in_one_go_and_again_as_a_no_op(self, plane, applied):
        assert "clusterrole.rbac.authorization.k8s.io/kontinue-operator created" in applied.stdout
        again = run_kubectl("apply", "-f", str(ROOT / "crds"), "-f", str(ROOT / "deploy" / "operator.yaml"),
                            kubeconfig=plane.admin_kubeconfig)
        lines = again.stdout.strip().splitlines()
        assert len(lines) == len(applied.stdout.strip().splitlines())
        assert all(line.endswith(" unchanged") for line in lines), again.stdout

    def test_the_operator_runs_with_the_rights_it_ships_with(self, plane, applied, tmp_path):
        namespace(plane, "ml", RESTRICTED)
        kubeconfig_path, token = service_account_kubeconfig(plane, "kontinue-system", "kontinue-operator",
                                                            tmp_path / "sa" / "kubeconfig")
        shipped = deployment_args(list(yaml.safe_load_all((ROOT / "deploy" / "operator.yaml").read_text())))
        log = operate(plane, shipped, kubeconfig_path, token, "ml", tmp_path, "kontinue")
        assert "Pausing" not in log  # mandatory peering, never paused for want of the object
        cleanup_pod_is_admitted(plane, "ml", token)
        violating_pod_is_refused(plane, "ml")
        # describe: the Event the operator posted shows under the run
        described = run_kubectl("describe", "trainingrun", "demo", "-n", "ml", kubeconfig=plane.admin_kubeconfig).stdout
        assert re.search(r"Normal\s+AttemptStarted\s+.*attempt 1: created pod demo-1", described), described

    def test_kubectl_explains_lists_and_describes_runs(self, plane, applied):
        admin = plane.admin_kubeconfig
        explained = run_kubectl("explain", "trainingrun.spec.checkpoint", kubeconfig=admin).stdout
        assert "GROUP:      kontinue.dev" in explained and "storage\t<string> -required-" in explained, explained
        for field in ("intervalSteps", "intervalMinutes", "secretRef"):
            assert field in explained, field
        namespace(plane, "columns")
        api(plane, "POST", runs_path("columns"), training_run("shown", "columns"))
        status = {"phase": "Running", "progress": "42%", "preemptions": 2, "failures": 1, "attempt": 4,
                  "message": "training: step 420 of 1000",
                  "bestCheckpoint": {"uri": "s3://kontinue-runs/checkpoints/columns/shown/model.ckpt",
                                     "metric": "acc", "score": 0.875}}
        api(plane, "PATCH", runs_path("columns", "shown") + "/status", {"status": status},
            content_type="application/merge-patch+json")
        table = run_kubectl("get", "trainingruns", "-n", "columns", kubeconfig=admin).stdout.splitlines()
        assert table[0].split() == ["NAME", "PHASE", "PROGRESS", "PREEMPTIONS", "FAILURES", "AGE"], table
        assert table[1].split()[:5] == ["shown", "Running", "42%", "2", "1"], table
        wide = run_kubectl("get", "ktr", "shown", "-n", "columns", "-o", "wide", kubeconfig=admin).stdout.splitlines()
        assert wide[0].split() == ["NAME", "PHASE", "PROGRESS", "PREEMPTIONS", "FAILURES", "ATTEMPT", "METRIC",
                                   "SCORE", "MESSAGE", "AGE"], wide
        assert wide[1].split()[:8] == ["shown", "Running", "42%", "2", "1", "4", "acc", "0.875"], wide
        assert "training: step 420 of 1000" in wide[1]
        described = run_kubectl("describe", "trainingrun", "shown", "-n", "columns", kubeconfig=admin).stdout
        for pattern in (r"Kind:\s+TrainingRun", r"Phase:\s+Running", r"Progress:\s+42%", r"Preemptions:\s+2",
                        r"Storage:\s+s3://kontinue-runs/checkpoints"):
            assert re.search(pattern, described), (pattern, described)


# --- helm install ------------------------------------------------------------------------------

@pytest.fixture(scope="class")
def installed(plane, tmp_path_factory):
    """Namespaces a (PodSecurity "restricted"), b and c; the release `kontinue` watches a and b."""
    home = tmp_path_factory.mktemp("helm")
    for name, labels in (("a", RESTRICTED), ("b", None), ("c", None)):
        namespace(plane, name, labels)
    # before the install: an operator facing a cluster without kopf's CRD says so (and does not run)
    with pytest.raises(kopf.TemporaryError) as missing:
        peering.ensure_peering(kube_config.new_client_from_config(str(plane.admin_kubeconfig)), "kontinue")
    values = home / "values.yaml"
    values.write_text(yaml.safe_dump({
        "namespaces": ["a", "b"], "trainerImage": TRAINER_IMAGE,
        "operator": {"allowedImages": ["registry.example/*"]}}))
    first = run_helm("install", "kontinue", str(CHART), "-n", "kontinue", "--create-namespace", "--values", str(values),
                     home=home, kubeconfig=plane.admin_kubeconfig, check=False)
    assert first.returncode == 0, first.stdout + first.stderr
    return {"home": home, "missing_crd": missing.value}


class TestHelmInstall:
    def test_installs_in_one_go_next_to_a_second_release(self, plane, installed):
        home, admin = installed["home"], plane.admin_kubeconfig
        second = run_helm("install", "kontinue-c", str(CHART), "-n", "team-c", "--create-namespace",
                          "--set", "namespaces={c}", home=home, kubeconfig=admin)
        assert "STATUS: deployed" in second.stdout
        # the same release name in another namespace would own the same cluster-scoped objects:
        # helm refuses it before creating anything
        clash = run_helm("install", "kontinue", str(CHART), "-n", "team-d", "--create-namespace",
                         home=home, kubeconfig=admin, check=False)
        assert clash.returncode != 0 and "cannot be imported into the current release" in clash.stderr, clash.stderr
        releases = json.loads(run_helm("list", "-A", "-o", "json", home=home, kubeconfig=admin).stdout)
        assert {(r["name"], r["namespace"], r["status"]) for r in releases} >= {
            ("kontinue", "kontinue", "deployed"), ("kontinue-c", "team-c", "deployed")}
        assert "not installed" in str(installed["missing_crd"]), installed["missing_crd"]

    def test_the_operator_may_act_only_in_its_namespaces(self, plane, installed):
        def can(account: str, *args: str) -> bool:
            done = run_kubectl("auth", "can-i", f"--as=system:serviceaccount:{account}", *args,
                               kubeconfig=plane.admin_kubeconfig, check=False)
            assert done.stdout.strip() in ("yes", "no"), done.stdout + done.stderr
            return done.stdout.strip() == "yes"

        ours, theirs = "kontinue:kontinue-operator", "team-c:kontinue-c-operator"
        for verb in ("create", "delete"):
            assert can(ours, verb, "pods", "-n", "a") and can(ours, verb, "pods", "-n", "b")
            assert not can(ours, verb, "pods", "-n", "c") and not can(ours, verb, "pods", "-n", "default")
            assert not can(ours, verb, "pods", "--all-namespaces")
        assert can(ours, "patch", "trainingruns.kontinue.dev/status", "-n", "a")
        assert not can(ours, "patch", "trainingruns.kontinue.dev", "-n", "c")
        assert not can(ours, "get", "secrets", "-n", "a")
        assert can(ours, "create", "clusterkopfpeerings.kopf.dev") and can(ours, "list", "namespaces")
        assert can(theirs, "create", "pods", "-n", "c") and not can(theirs, "create", "pods", "-n", "a")

    def test_the_operator_works_in_its_namespace_with_the_rights_it_ships_with(self, plane, installed, tmp_path):
        api(plane, "POST", runs_path("c"), training_run("elsewhere", "c"))  # not watched: left alone
        kubeconfig_path, token = service_account_kubeconfig(plane, "kontinue", "kontinue-operator",
                                                            tmp_path / "sa" / "kubeconfig")
        manifest = run_helm("get", "manifest", "kontinue", "-n", "kontinue", home=installed["home"],
                            kubeconfig=plane.admin_kubeconfig).stdout
        args = deployment_args(list(yaml.safe_load_all(manifest)))
        assert args[:5] == ["operator", "-n", "a", "-n", "b"]
        operate(plane, args, kubeconfig_path, token, "a", tmp_path, "kontinue")
        cleanup_pod_is_admitted(plane, "a", token)
        violating_pod_is_refused(plane, "a")
        assert "status" not in api(plane, "GET", runs_path("c", "elsewhere"))
