"""The generated CRDs: up to date, structural, documented, and accepted as CRD objects."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kontinue.api import HYPERPARAMETERS
from kontinue.api.crd import HEADER, build_crds, crd_filename, to_yaml
from kontinue.cli import main

CRD_DIR = Path(__file__).resolve().parents[1] / "crds"
CRDS = build_crds()
SCHEMAS = {crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for crd in CRDS}
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


@pytest.mark.parametrize("crd", CRDS, ids=crd_filename)
def test_committed_crds_match_the_models(crd):
    path = CRD_DIR / crd_filename(crd)
    assert path.exists() and path.read_text() == HEADER + to_yaml(crd), \
        f"{path} is stale: run `make crds` (kontinue crds --out crds/) and commit the result"


def test_crd_directory_holds_only_generated_files():
    assert sorted(p.name for p in CRD_DIR.glob("*.yaml")) == sorted(crd_filename(crd) for crd in CRDS)


def test_generation_is_stable_and_the_command_writes_the_same_bytes(tmp_path, capsys):
    assert [to_yaml(crd) for crd in build_crds()] == [to_yaml(crd) for crd in CRDS]
    assert main(["crds", "--out", str(tmp_path)]) == 0
    for crd in CRDS:
        assert (tmp_path / crd_filename(crd)).read_text() == (CRD_DIR / crd_filename(crd)).read_text()
    capsys.readouterr()
    assert main(["crds"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(HEADER) and list(yaml.safe_load_all(printed)) == CRDS


def _structural_problems(node, path="openAPIV3Schema"):
    """The rules of a Kubernetes structural schema that a wrong conversion could break."""
    problems = []
    for key in ("$ref", "$defs", "definitions", "const", "oneOf", "allOf", "not", "title", "nullable"):
        if key in node:
            problems.append(f"{path}: has {key}")
    if "anyOf" in node and not (node.get("x-kubernetes-int-or-string") and node["anyOf"] == INT_OR_STRING):
        problems.append(f"{path}: anyOf outside an int-or-string")
    if "type" not in node and not (node.get("x-kubernetes-preserve-unknown-fields")
                                   or node.get("x-kubernetes-int-or-string")):
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{path}: array without items")
    if not isinstance(node.get("additionalProperties", {}), dict):
        problems.append(f"{path}: additionalProperties must be a schema")
    if "exclusiveMinimum" in node and node["exclusiveMinimum"] is not True:
        problems.append(f"{path}: exclusiveMinimum must be the OpenAPI v3 boolean")
    if node.get("default", "") is None:
        problems.append(f"{path}: null default")
    for name, child in node.get("properties", {}).items():
        problems += _structural_problems(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += _structural_problems(node[key], f"{path}.{key}")
    return problems


def _properties(node, path=""):
    for name, child in node.get("properties", {}).items():
        yield f"{path}.{name}".lstrip("."), child
        yield from _properties(child, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _properties(node[key], f"{path}[]")


@pytest.mark.parametrize("kind", SCHEMAS)
def test_schemas_are_structural(kind):
    assert _structural_problems(SCHEMAS[kind]) == []


@pytest.mark.parametrize("kind", SCHEMAS)
def test_every_property_has_a_description(kind):
    undocumented = [path for path, node in _properties(SCHEMAS[kind])
                    if path != "metadata" and not node.get("description")]
    assert undocumented == []


def test_schema_details():
    spec = SCHEMAS["TrainingRun"]["properties"]["spec"]
    minutes = spec["properties"]["checkpoint"]["properties"]["intervalMinutes"]
    assert (minutes["type"], minutes["minimum"], minutes["exclusiveMinimum"]) == ("number", 0, True)
    hyperparameters = spec["properties"]["hyperparameters"]
    assert hyperparameters["x-kubernetes-preserve-unknown-fields"] is True  # model.timm_image_1.* and the like
    assert set(hyperparameters["properties"]) == set(HYPERPARAMETERS)  # each documented, for kubectl explain
    assert "Default: 0.9." in hyperparameters["properties"]["optim.lr_decay"]["description"]
    assert spec["properties"]["seed"]["default"] == 0 and spec["required"] == ["task", "data", "checkpoint"]
    assert "problemType" in spec["properties"]["task"]["properties"]
    conditions = SCHEMAS["TrainingRun"]["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "sourceDumpUri" in SCHEMAS["TransferRun"]["properties"]["status"]["properties"]
    assert "model" not in SCHEMAS["TransferRun"]["properties"]["spec"]["required"]


def test_cel_rules_sit_with_their_fields():
    spec = SCHEMAS["TrainingRun"]["properties"]["spec"]
    def rules(node):
        return [rule["rule"] for rule in node.get("x-kubernetes-validations", [])]

    assert rules(spec) == ["has(self.model) != has(self.continueFrom)"]
    assert rules(spec["properties"]["continueFrom"]) == ["has(self.trainingRun) != has(self.modelUri)"]
    assert "has(self.secretRef)" in rules(spec["properties"]["checkpoint"])[0]
    assert "has(self.hfText)" in rules(spec["properties"]["model"])[0]
    assert "has(self.label)" in rules(spec["properties"]["task"])[0]
    transfer = SCHEMAS["TransferRun"]["properties"]["spec"]
    assert rules(transfer["properties"]["source"]) == ["has(self.trainingRun) != has(self.modelUri)"]


@pytest.mark.parametrize("crd", CRDS, ids=crd_filename)
def test_names_columns_and_version(crd):
    names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == f"{names['plural']}.kontinue.dev" and crd["spec"]["scope"] == "Namespaced"
    assert names["shortNames"] == [{"TrainingRun": "ktr", "TransferRun": "kxr"}[names["kind"]]]
    assert names["categories"] == ["kontinue"] and names["listKind"] == names["kind"] + "List"
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {column["name"]: column for column in version["additionalPrinterColumns"]}
    assert list(columns)[:4] == ["Phase", "Progress", "Preemptions", "Failures"]
    assert columns["Preemptions"]["type"] == "integer" and columns["Age"]["type"] == "date"
    assert all(columns[name].get("priority") == 1 for name in ("Attempt", "Score", "Message"))


@pytest.mark.parametrize("crd", CRDS, ids=crd_filename)
def test_kubernetes_accepts_the_crd_object(crd):
    kubernetes_validate.validate(crd, kubernetes_validate.utils.latest_version(), strict=True)


def test_started_runs_keep_their_immutable_fields_and_status_pins_the_spec():
    for kind, schema in SCHEMAS.items():
        rules = schema["x-kubernetes-validations"]
        assert all("oldSelf.status.attempt > 0" in rule["rule"] for rule in rules), "transition rules at the root"
        seed = next(rule for rule in rules if rule["fieldPath"] == ".spec.seed")
        assert seed["message"] == "spec.seed is immutable once the run has started; create a new run"
        assert "Immutable once the run has started" in schema["properties"]["spec"]["properties"]["seed"]["description"]
        status = schema["properties"]["status"]["properties"]
        assert status["specDigest"]["type"] == "string"
        assert status["specFieldDigests"]["additionalProperties"] == {"type": "string"}
