"""The Helm chart (helm/kontinue): lints, renders valid manifests equal in substance to
deploy/operator.yaml, passes its values through to the operator, confines its RBAC to `namespaces`
when given, and ships the generated CRDs. (tests/test_install.py installs it into a real cluster.)"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests import test_deploy
from tests.test_crds import CRD_DIR
from tests.test_deploy import ROOT, documents
from tests.tools import run_helm

CHART = ROOT / "helm" / "kontinue"
PEERING_CRDS = {"ClusterKopfPeering": "kopf.dev_clusterkopfpeerings.yaml"}

OPTIONS = {
    "namespaces": ["a", "b"],
    "peering": {"standalone": True},
    "image": {"repository": "registry.example/kontinue", "tag": "9.9.9", "pullPolicy": "Always"},
    "trainerImage": "trainer:x",
    "operator": {"graceSeconds": 30, "imagePullTimeout": 600, "backoffSeconds": 5, "progressSeconds": 20,
                 "allowedImages": ["registry.example/team/*", "trainer:?"]},
    "metrics": {"port": 9191, "service": {"enabled": True, "port": 80}},
    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    "nodeSelector": {"pool": "system"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
    "serviceAccount": {"name": "kontinue-sa"},
}


def helm(tmp_path: Path, *args: str, check: bool = True):
    return run_helm(*args, home=tmp_path, check=check)


def render(tmp_path: Path, values: dict | None = None, release: str = "kontinue") -> list[dict]:
    args = ["template", release, str(CHART), "--namespace", "kontinue"]
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["--values", str(path)]
    return [d for d in yaml.safe_load_all(helm(tmp_path, *args).stdout) if d]


def one(manifests: list[dict], kind: str) -> dict:
    [found] = [d for d in manifests if d["kind"] == kind]
    return found


def args_of(manifests: list[dict]) -> list[str]:
    return one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def test_helm_lint_strict(tmp_path):
    assert "0 chart(s) failed" in helm(tmp_path, "lint", "--strict", str(CHART)).stdout
    helm(tmp_path, "lint", "--strict", str(CHART), "--values", str(_values_file(tmp_path)))


def _values_file(tmp_path: Path) -> Path:
    path = tmp_path / "options.yaml"
    path.write_text(yaml.safe_dump(OPTIONS))
    return path


@pytest.mark.parametrize("values", [None, OPTIONS], ids=["defaults", "options"])
def test_rendered_manifests_validate_against_the_kubernetes_schemas(tmp_path, values):
    manifests = render(tmp_path, values)
    assert {d["kind"] for d in manifests} >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"}
    for document in manifests:
        # only built-in kinds: `helm install` creates no object of a CRD (kopf's peering object is
        # the operator's to create), so one install works on a fresh cluster
        assert document["apiVersion"].split("/")[0] in test_deploy.BUILT_IN_GROUPS, document["kind"]
        kubernetes_validate.validate(document, "1.33.0", strict=True)


def test_defaults_render_what_deploy_operator_yaml_installs(tmp_path, monkeypatch):
    manifests = render(tmp_path)
    deploy = documents()
    assert one(manifests, "ClusterRole")["rules"] == one(deploy, "ClusterRole")["rules"]
    binding, deployment = one(manifests, "ClusterRoleBinding"), one(manifests, "Deployment")
    account = one(manifests, "ServiceAccount")["metadata"]["name"]
    assert binding["roleRef"]["name"] == one(manifests, "ClusterRole")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": "kontinue"}]
    assert not {"Role", "RoleBinding"} & {d["kind"] for d in manifests}
    pod, expected = deployment["spec"]["template"]["spec"], one(deploy, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account
    for key in ("securityContext", "volumes"):
        assert pod[key] == expected[key]
    container, expected = pod["containers"][0], expected["containers"][0]
    for key in ("image", "ports", "livenessProbe", "readinessProbe", "resources", "securityContext", "volumeMounts"):
        assert container[key] == expected[key], key
    args = container["args"]
    assert args[:4] == expected["args"][:4] == ["operator", "--all-namespaces", "--peering", "kontinue"]
    assert args[args.index("--image") + 1] == expected["image"] and "--standalone" not in args
    assert "--allowed-images" not in args  # empty allowedImages: the operator's default
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


def test_values_reach_the_operator(tmp_path):
    manifests = render(tmp_path, OPTIONS)
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
    assert value("--allowed-images") == "registry.example/team/*,trainer:?"
    assert (value("--grace-seconds"), value("--image-pull-timeout"), value("--backoff-seconds"),
            value("--progress-seconds"), value("--metrics-port")) == ("30", "600", "5", "20", "9191")
    assert (container["image"], container["imagePullPolicy"]) == ("registry.example/kontinue:9.9.9", "Always")
    assert container["resources"] == OPTIONS["resources"]
    assert pod["nodeSelector"] == OPTIONS["nodeSelector"] and pod["tolerations"] == OPTIONS["tolerations"]
    assert {"name": "metrics", "containerPort": 9191} in container["ports"]
    assert pod["serviceAccountName"] == "kontinue-sa" == one(manifests, "ServiceAccount")["metadata"]["name"]
    service = one(manifests, "Service")
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "80"
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    shipped = one(documents(), "Deployment")["spec"]["template"]["spec"]  # locked down whatever the values
    assert pod["securityContext"] == shipped["securityContext"]
    for key in ("securityContext", "livenessProbe", "readinessProbe"):
        assert container[key] == shipped["containers"][0][key], key


def test_allowed_images_are_passed_comma_joined(tmp_path):
    args = args_of(render(tmp_path, {"operator": {"allowedImages": ["registry.example/kontinue:*"]}}))
    assert args[args.index("--allowed-images") + 1] == "registry.example/kontinue:*"
    assert args.index("--allowed-images") == args.index("--image") + 2


def test_peering_is_named_after_the_release_unless_named(tmp_path):
    """The operator creates the ClusterKopfPeering; each release peers in its own unless told to share."""
    args = args_of(render(tmp_path, release="team-a"))
    assert args[args.index("--peering") + 1] == "team-a" and args[args.index("--priority") + 1] == "100"
    manifests = render(tmp_path, {"peering": {"name": "team", "priority": 7}, "image": {"tag": "1.2.3"}})
    args = args_of(manifests)
    assert args[args.index("--peering") + 1] == "team" and args[args.index("--priority") + 1] == "7"
    assert args[args.index("--image") + 1] == "ghcr.io/kontinue-dev/kontinue:1.2.3"
    assert not [d for d in manifests if d["apiVersion"].startswith("kopf.dev/")]


def test_an_operator_of_some_namespaces_gets_its_rights_only_there(tmp_path):
    manifests = render(tmp_path, {"namespaces": ["a", "b"]})
    account = {"kind": "ServiceAccount", "name": "kontinue-operator", "namespace": "kontinue"}
    shipped = one(documents(), "ClusterRole")["rules"]
    cluster_rules = one(manifests, "ClusterRole")["rules"]
    namespaced = [rule for rule in shipped if rule not in cluster_rules]
    assert {"pods", "pods/log", "events", "trainingruns", "transferruns"} <= \
        {resource for rule in namespaced for resource in rule["resources"]}
    assert not {"pods", "events", "trainingruns"} & {r for rule in cluster_rules for r in rule["resources"]}
    assert {r for rule in cluster_rules for r in rule["resources"]} == \
        {"namespaces", "customresourcedefinitions", "clusterkopfpeerings"}
    assert one(manifests, "ClusterRoleBinding")["subjects"] == [account]
    roles = [d for d in manifests if d["kind"] == "Role"]
    bindings = [d for d in manifests if d["kind"] == "RoleBinding"]
    assert [r["metadata"]["namespace"] for r in roles] == [b["metadata"]["namespace"] for b in bindings] == ["a", "b"]
    for role, binding in zip(roles, bindings):
        assert role["rules"] == namespaced
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [account]
    assert args_of(manifests)[:6] == ["operator", "-n", "a", "-n", "b", "--peering"]


def test_namespace_patterns_need_your_own_rbac(tmp_path):
    refused = helm(tmp_path, "template", "kontinue", str(CHART), "--set", "namespaces={team-*}", check=False)
    assert refused.returncode != 0 and "is a pattern, and a Role needs a namespace's name" in refused.stderr
    manifests = render(tmp_path, {"namespaces": ["team-*"], "rbac": {"create": False}})
    assert args_of(manifests)[:3] == ["operator", "-n", "team-*"]


def test_rbac_and_service_account_can_be_left_to_others(tmp_path):
    manifests = render(tmp_path, {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    assert {d["kind"] for d in manifests} == {"Deployment"}
    assert one(manifests, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"


def test_chart_crds_are_the_generated_ones():
    """Written by `make crds`: byte-identical copies of crds/ plus kopf's peering CRD of deploy/operator.yaml."""
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
