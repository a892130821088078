"""The shipped operator manifests are valid Kubernetes objects, locked down like the trainer pods.
(tests/test_install.py applies them to a real cluster and runs the operator with their rights.)"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]
# API groups every cluster serves: kubectl can map their objects in the same command that applies CRDs
BUILT_IN_GROUPS = {"v1", "apps", "rbac.authorization.k8s.io", "apiextensions.k8s.io"}


def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / "operator.yaml").read_text()) if d]


def test_operator_manifests_validate_against_the_kubernetes_schemas():
    for document in documents():
        kubernetes_validate.validate(document, "1.33.0", strict=True)


def test_one_kubectl_apply_installs_everything():
    """No object of a custom resource: `kubectl apply -f crds/ -f deploy/operator.yaml` maps every
    object before it creates any, so one of a CRD applied in the same command would fail it. The
    operator creates its ClusterKopfPeering at startup, and may (create on clusterkopfpeerings)."""
    assert {d["apiVersion"].split("/")[0] for d in documents()} <= BUILT_IN_GROUPS
    crds = {d["spec"]["names"]["kind"] for d in documents() if d["kind"] == "CustomResourceDefinition"}
    assert crds == {"ClusterKopfPeering"}
    role = next(d for d in documents() if d["kind"] == "ClusterRole")
    [peering] = [rule for rule in role["rules"] if rule["apiGroups"] == ["kopf.dev"]]
    assert peering["resources"] == ["clusterkopfpeerings"]
    assert set(peering["verbs"]) == {"get", "list", "watch", "patch", "create"}
    container = next(d for d in documents() if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][container["args"].index("--peering") + 1] == "kontinue"


def test_operator_deployment_is_locked_down_and_probed():
    deployment = next(d for d in documents() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"][0] == "operator" and "--standalone" not in container["args"]
    assert deployment["spec"]["replicas"] == 1


def test_the_operator_role_cannot_replace_or_delete_trainingruns():
    role = next(d for d in documents() if d["kind"] == "ClusterRole")
    for rule in role["rules"]:
        if "trainingruns" in rule["resources"]:
            assert not {"update", "create", "delete"} & set(rule["verbs"])


def test_the_operator_role_reads_no_secrets():
    """Storage is touched only by the run's own pods, which get the Secret as variables."""
    role = next(d for d in documents() if d["kind"] == "ClusterRole")
    assert not any("secrets" in rule["resources"] for rule in role["rules"])
    assert any("pods/log" in rule["resources"] and rule["verbs"] == ["get"] for rule in role["rules"])
