"""The CRDs' CEL rules (x-kubernetes-validations), evaluated with cel-python: they compile, and on
valid and invalid manifests they refuse exactly what the pydantic models refuse, with the same message.
The transition rules (with oldSelf; only the API server sees an update) refuse exactly the changes of
immutable fields once a run has started, each naming its field."""

import ast
import copy
import gc
import inspect
import re
from functools import cache
from pathlib import Path

import celpy
import pytest
import yaml

from kontinue.api import SpecError, models, parse_resource
from kontinue.api.identity import IMMUTABLE_FIELDS, spec_digest
from tests.test_api import (CONTINUED, DELETE, TRAINING, TRAINING_CASES, TRANSFER, TRANSFER_CASES, VOLUME,
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


def transition(rule):
    """A rule with oldSelf runs on updates only: the API server skips it on create."""
    return re.search(r"\boldSelf\b", rule["rule"]) is not None


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
    broken = [(path, rule) for rule in schema.get("x-kubernetes-validations", [])
              if not transition(rule) and not holds(rule["rule"], value)]
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
    assert broken == {(kind, path, rule["rule"]) for kind, path, rule in RULES if not transition(rule)}


def test_every_model_rule_is_in_the_crds():
    written = [node for node in ast.walk(ast.parse(inspect.getsource(models)))
               if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Rule"]
    rules = [o for o in gc.get_objects() if isinstance(o, models.Rule) and o.holds.__module__ == models.__name__]
    assert len(rules) == len(written)
    in_crds = {(rule["rule"], rule["message"]) for _, _, rule in RULES}
    assert [rule for rule in rules if (rule.cel, rule.message) not in in_crds] == []


# -- immutable fields once a run has started: transition rules at the root ---------------------------

def update_refusals(old, new):
    """Messages of the root transition rules that refuse the update old -> new, both as stored
    (defaults filled in), as the API server evaluates them."""
    schema = SCHEMAS[new["kind"]]
    old, new = admitted(schema, old), admitted(schema, new)
    refused = []
    for rule in schema.get("x-kubernetes-validations", []):
        assert transition(rule), "only transition rules sit at the root"
        result = program(rule["rule"]).evaluate({"self": celpy.json_to_cel(new), "oldSelf": celpy.json_to_cel(old)})
        assert isinstance(result, celpy.celtypes.BoolType), f"{rule['rule']} gives {result!r}"
        if not result:
            refused.append(rule["message"])
    return refused


def with_status(document, **status):
    return {**copy.deepcopy(document), "status": status}


def refused_field(field):
    return f"spec.{field} is immutable once the run has started; create a new run"


IMMUTABLE_EDITS = {  # kind -> (immutable field, an edit of it)
    "TrainingRun": [
        ("task", (("spec", "task", "evalMetric"), "log_loss")),
        ("task", (("spec", "task", "columnTypes"), {"Description": "text"})),
        ("data", (("spec", "data", "test"), DELETE)),
        ("data", (("spec", "data", "train"), "s3://datasets/petfinder/train-2.parquet")),
        ("model", (("spec", "model", "hfText", "maxTextLen"), 128)),
        ("seed", (("spec", "seed"), 7)),
        ("seed", (("spec", "seed"), DELETE)),  # 42 -> the default 0
        ("resources.gpus", (("spec", "resources", "gpus"), 2)),
        ("resources.gpus", (("spec", "resources"), DELETE)),  # 1 -> 0
        ("checkpoint.storage", (("spec", "checkpoint", "storage"), "s3://checkpoints/elsewhere")),
        ("timeLimit", (("spec", "timeLimit"), "3h")),
        ("timeLimit", (("spec", "timeLimit"), DELETE)),
    ],
    "TransferRun": [
        ("source", (("spec", "source"), {"modelUri": "s3://models/sst"})),
        ("backbones", (("spec", "backbones"), DELETE)),
        ("model", (("spec", "model"), {"hfText": {"checkpoint": "bert-base-uncased"}})),
        ("resources.gpus", (("spec", "resources", "gpus"), 1)),
        ("checkpoint.storage", (("spec", "checkpoint", "storage"), "/checkpoints/v2")),
    ],
}
SAFE_EDITS = [  # what may change at any time
    (("spec", "maxPreemptions"), 3), (("spec", "backoffLimit"), 0), (("spec", "deleteRunDirectory"), True),
    (("spec", "dumpModel"), False), (("spec", "image"), "ghcr.io/example/kontinue-trainer:0.1.1"),
    (("spec", "resources", "cpu"), "12"), (("spec", "resources", "memory"), "64Gi"),
    (("spec", "resources", "nodeSelector"), {"pool": "a100"}), (("spec", "resources", "tolerations"), []),
    (("spec", "resources", "priorityClassName"), "training"), (("spec", "checkpoint", "intervalSteps"), 100),
    (("spec", "checkpoint", "intervalMinutes"), 3), (("metadata", "labels"), {"team": "nlp"}),
]
BASES = {"TrainingRun": TRAINING, "TransferRun": TRANSFER}
EDIT_CASES = [(kind, field, edit) for kind, edits in IMMUTABLE_EDITS.items() for field, edit in edits]


def test_there_is_one_named_rule_per_immutable_field_cel_can_see():
    for kind, schema in SCHEMAS.items():
        rules = {rule["fieldPath"]: rule for rule in schema["x-kubernetes-validations"]}
        own = {"TrainingRun": {"continueFrom"}, "TransferRun": {"source", "backbones"}}[kind]
        fields = [name for name in IMMUTABLE_FIELDS if name != "hyperparameters"
                  and (name not in ("continueFrom", "source", "backbones") or name in own)]
        assert list(rules) == [f".spec.{name}" for name in fields], kind
        assert all(rule["message"] == refused_field(name) and rule["reason"] == "FieldValueForbidden"
                   for name, rule in zip(fields, rules.values()))
        # hyperparameters' values are free-form (preserve-unknown-fields), which CEL cannot see: the
        # operator's spec digest guards them (SpecChanged)
        hyperparameters = schema["properties"]["spec"]["properties"]["hyperparameters"]
        assert "checked by the operator" in hyperparameters["description"]


@pytest.mark.parametrize("kind, field, edit", EDIT_CASES, ids=[f"{k} {f} {e[0][-1]}" for k, f, e in EDIT_CASES])
def test_a_started_run_refuses_a_change_of_each_immutable_field_naming_it(kind, field, edit):
    old = with_status(BASES[kind], attempt=1, phase="Running")
    new = with_status(changed(BASES[kind], edit), attempt=1, phase="Running")
    parse_resource(new)  # a valid spec: only the transition refuses it
    assert update_refusals(old, new) == [refused_field(field)]
    assert spec_digest(parse_resource(old).spec) != \
        spec_digest(parse_resource(new).spec), \
        "the operator sees the same change"
    for status in ({}, {"attempt": 0, "phase": "Pending"}):  # not started yet: anything may change
        old, new = with_status(BASES[kind], **status), with_status(changed(BASES[kind], edit), **status)
        assert update_refusals(old, new) == []
    assert update_refusals(with_status(BASES[kind]) | {"status": None}, changed(BASES[kind], edit)) == []


@pytest.mark.parametrize("kind", BASES)
def test_a_started_run_takes_safe_edits_and_its_status(kind):
    old = with_status(BASES[kind], attempt=3, phase="Preempted")
    new = with_status(changed(BASES[kind], *SAFE_EDITS), attempt=3, phase="Preempted")
    assert update_refusals(old, new) == []
    assert update_refusals(old, with_status(BASES[kind], attempt=4, phase="Running")) == []
    several = changed(BASES[kind], (("spec", "seed"), 1), (("spec", "timeLimit"), "5h"))
    assert update_refusals(old, with_status(several, attempt=3)) == [refused_field("seed"), refused_field("timeLimit")]


def test_resources_added_to_a_started_run_without_them_keep_their_gpus():
    old = with_status(changed(TRAINING, (("spec", "resources"), DELETE)), attempt=1)
    for resources, refused in [({"cpu": "4"}, []), ({"gpus": 0, "memory": "8Gi"}, []),
                               ({"gpus": 1}, [refused_field("resources.gpus")])]:
        assert update_refusals(old, changed(old, (("spec", "resources"), resources))) == refused, resources
