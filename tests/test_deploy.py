"""The shipped operator manifests are valid Kubernetes objects, locked down like the trainer pods."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[1]


def documents() -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / "operator.yaml").read_text()) if d]


def test_operator_manifests_validate_against_the_kubernetes_schemas():
    for document in documents():
        if document["apiVersion"].startswith("kopf.dev/"):
            continue  # a custom resource: its CRD is in the same file
        kubernetes_validate.validate(document, "1.33.0", strict=True)


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
