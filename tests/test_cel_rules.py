"""The CRDs' CEL rules (x-kubernetes-validations), evaluated with cel-python: they compile, and on
valid and invalid manifests they refuse exactly what the pydantic models refuse, with the same message."""

import ast
import gc
import inspect
import re
from functools import cache
from pathlib import Path

import celpy
import pytest
import yaml

from kontinue.api import SpecError, models, parse_resource
from tests.test_api import (CONTINUED, TRAINING, TRAINING_CASES, TRANSFER, TRANSFER_CASES, VOLUME,
                            VOLUME_CASES, changed)

CRD_DIR = Path(__file__).resolve().parents[1] / "crds"
SCHEMAS = {crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
           for crd in (yaml.safe_load(path.read_text()) for path in sorted(CRD_DIR.glob("*.yaml")))}
ENV = celpy.Environment()


def collect_rules(schema, path=""):
    """(schema path such as spec.volumes[].name, rule) for every CEL rule at or under `schema`;
    [] stands for any list item or map value."""
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule
    for name, child in schema.get("properties", {}).items():
        yield from collect_rules(child, f"{path}.{name}".lstrip("."))
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from collect_rules(schema[key], f"{path}[]")


RULES = [(kind, path, rule) for kind, schema in SCHEMAS.items() for path, rule in collect_rules(schema)]


@cache
def program(rule):
    return ENV.program(ENV.compile(rule))


def holds(rule, value):
    result = program(rule).evaluate({"self": celpy.json_to_cel(value)})
    assert isinstance(result, celpy.celtypes.BoolType), f"{rule} gives {result!r}, not a bool"
    return bool(result)


def admitted(schema, value):
    """`value` as the API server validates it: null fields pruned, then schema defaults filled in."""
    if isinstance(value, dict) and "properties" in schema:
        value = {**{name: child["default"] for name, child in schema["properties"].items() if "default" in child},
                 **{key: item for key, item in value.items() if item is not None}}
        return {key: admitted(schema["properties"].get(key, {}), item) for key, item in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [admitted(schema["items"], item) for item in value]
    return value


def broken_rules(schema, value, path=""):
    """(field path, rule) of every rule that is false, each evaluated with `self` = the value at its
    node, as the API server does: a rule on an absent field does not run. Evaluation errors raise."""
    broken = [(path, rule) for rule in schema.get("x-kubernetes-validations", []) if not holds(rule["rule"], value)]
    if isinstance(value, dict):
        for key, item in value.items():
            if key in schema.get("properties", {}):
                broken += broken_rules(schema["properties"][key], item, f"{path}.{key}".lstrip("."))
            elif isinstance(schema.get("additionalProperties"), dict):
                broken += broken_rules(schema["additionalProperties"], item, f"{path}[{key}]")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            broken += broken_rules(schema["items"], item, f"{path}[{index}]")
    return broken


def cel_refusals(document):
    schema = SCHEMAS[document["kind"]]
    return broken_rules(schema, admitted(schema, document))


VALID = {
    "trainingrun": TRAINING,
    "continued trainingrun": CONTINUED,
    "transferrun": TRANSFER,
    "object detection without label, from a COCO file": changed(
        TRANSFER, (("spec", "task"), {"problemType": "object_detection"}),
        (("spec", "model"), {"mmdetImage": {"checkpoint": "retinanet_r18_fpn_1x_coco", "imageSize": 320}}),
        (("spec", "data", "train"), "s3://datasets/shapes/train.json")),
    "timm image size and column types": changed(TRANSFER, (("spec", "model"), {"timmImage": {
        "checkpoint": "resnet18", "imageSize": 64}}), (("spec", "task", "columnTypes"), {"photo": "image_path"})),
    "explicit nulls": changed(CONTINUED, (("spec", "model"), None), (("spec", "checkpoint", "intervalSteps"), None)),
    "trainingrun with volumes": changed(TRAINING, (("spec", "volumes"), TRANSFER["spec"]["volumes"])),
    "mountPaths that only share a prefix": changed(TRANSFER, (("spec", "volumes"), [
        {**VOLUME, "name": "a", "mountPath": "/data"}, {**VOLUME, "name": "b", "mountPath": "/data2"},
        {**VOLUME, "name": "c", "mountPath": "/scratchpad"}, {**VOLUME, "name": "d", "mountPath": "/tmp2/x"},
        {**VOLUME, "name": "e", "mountPath": "/devices"}])),
}
# id -> (document, field path pydantic names, whether a CEL rule refuses it rather than the
# openAPIV3Schema, the list-map keys or checks the API server leaves to kontinue such as hyperparameters)
INVALID = {
    **{f"TrainingRun {name}": (changed(TRAINING, *edits), path, by_schema is False)
       for name, (edits, path, by_schema) in TRAINING_CASES.items()},
    **{f"TransferRun {name}": (changed(TRANSFER, *edits), path, by_schema is False)
       for name, (edits, path, by_schema) in TRANSFER_CASES.items()},
    **{f"{base['kind']} volumes {name}": (changed(base, (("spec", "volumes"), volumes)), path, crd == "CEL")
       for name, (volumes, path, _, crd) in VOLUME_CASES.items() for base in (TRAINING, TRANSFER)},
}


@pytest.mark.parametrize("kind, path, rule", RULES, ids=[f"{kind} {path}" for kind, path, _ in RULES])
def test_every_rule_compiles(kind, path, rule):
    assert program(rule["rule"]) and rule["message"]


@pytest.mark.parametrize("document", VALID.values(), ids=VALID)
def test_valid_manifests_pass_every_rule(document):
    parse_resource(document)
    assert cel_refusals(document) == []


@pytest.mark.parametrize("document, path, by_cel", INVALID.values(), ids=INVALID)
def test_invalid_manifests_break_the_rule_pydantic_names(document, path, by_cel):
    with pytest.raises(SpecError) as error:
        parse_resource(document)
    problems = {problem.path: problem.message for problem in error.value.problems}
    refusals = cel_refusals(document)
    if not by_cel:
        assert path in problems and refusals == [], (problems, refusals)
        return
    assert list(problems) == [path] and len(refusals) == 1, (problems, refusals)
    (where, rule), = refusals  # at the field, or at the list for a rule across its items
    assert (path == where or path.startswith(where + "[")) and rule["message"] in problems[path], (problems, rule)


def test_every_rule_is_broken_by_some_invalid_manifest():
    broken = {(document["kind"], re.sub(r"\[[^]]*\]", "[]", where), rule["rule"])
              for document, _, by_cel in INVALID.values() if by_cel for where, rule in cel_refusals(document)}
    assert broken == {(kind, path, rule["rule"]) for kind, path, rule in RULES}


def test_every_model_rule_is_in_the_crds():
    written = [node for node in ast.walk(ast.parse(inspect.getsource(models)))
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Rule"]
    rules = [o for o in gc.get_objects() if isinstance(o, models.Rule) and o.holds.__module__ == models.__name__]
    assert len(rules) == len(written)
    in_crds = {(rule["rule"], rule["message"]) for _, _, rule in RULES}
    assert [rule for rule in rules if (rule.cel, rule.message) not in in_crds] == []
