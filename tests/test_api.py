"""The TrainingRun / TransferRun models: what they accept, what they refuse and where."""

import copy
from pathlib import Path

import pytest

from kontinue.api.families import FAMILIES, OBJECT_DETECTION, PROBLEM_TYPES, SPEC_FAMILIES

from kontinue.api import (SpecError, TrainingRun, TrainingRunStatus, TransferRun, crd_schema, load_documents,
                          load_manifest, parse_resource, parse_training_run, parse_transfer_run,
                          validate_hyperparameters)
from kontinue.api.manifests import schema_problems

MANIFESTS = Path(__file__).parent / "manifests"
TRAINING, CONTINUED = load_documents((MANIFESTS / "valid-trainingrun.yaml").read_text())[1:]
TRANSFER = load_documents((MANIFESTS / "valid-transferrun.yaml").read_text())[0]
DELETE = object()


def changed(document, *edits):
    """A copy of `document` with (path tuple, value or DELETE) edits applied."""
    document = copy.deepcopy(document)
    for path, value in edits:
        node = document
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return document


def refused(parse, document):
    with pytest.raises(SpecError) as error:
        parse(document)
    return {problem.path: problem.message for problem in error.value.problems}


def test_valid_training_runs_parse():
    run = parse_training_run(TRAINING)
    assert run.spec.task.problem_type == "multiclass" and run.spec.model.backbones() == ["hf_text", "timm_image"]
    assert run.spec.model.hf_text.max_text_len == 256 and run.spec.resources.memory == "32Gi"
    assert run.spec.resources.tolerations[1].toleration_seconds == 300
    assert run.spec.time_limit_seconds() == 9000
    assert run.run_directory() == "s3://checkpoints/kontinue/ml/petfinder-adoption/"
    assert schema_problems(TRAINING) == []
    continued = parse_training_run(CONTINUED)
    assert continued.spec.continue_from.training_run == "petfinder-adoption" and continued.spec.model is None
    assert (continued.spec.seed, continued.spec.max_preemptions, continued.spec.backoff_limit) == (0, 20, 3)
    assert continued.spec.dump_model and not continued.spec.delete_run_directory
    assert schema_problems(CONTINUED) == []


def test_valid_transfer_run_parses():
    run = parse_transfer_run(TRANSFER)
    assert run.spec.source.training_run == "sst-sentiment" and run.spec.backbones == ["hf_text"]
    assert run.spec.model is None and run.spec.resources.cpu == "3500m" and run.spec.time_limit_seconds() == 1800
    assert run.run_directory() == "/checkpoints/ml/sts-from-sst/"
    assert schema_problems(TRANSFER) == []
    assert isinstance(parse_resource(TRANSFER), TransferRun) and isinstance(parse_resource(TRAINING), TrainingRun)


def test_dump_is_camel_case_and_valid_against_the_crd():
    dumped = parse_training_run(TRAINING).model_dump(mode="json", exclude_none=True)
    assert dumped["spec"]["checkpoint"]["secretRef"] == {"name": "minio-credentials"}
    assert schema_problems(dumped) == [] and parse_training_run(dumped) == parse_training_run(TRAINING)


def test_status_from_the_cluster_and_from_the_operator():
    status = {"phase": "Running", "attempt": 2, "preemptions": 1, "progress": "42%", "progressRatio": 0.42,
              "startTime": "2025-01-02T03:04:05Z", "lastCheckpoint": {"uri": "s3://c/x/last.ckpt", "step": 500},
              "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2025-01-02T03:04:05Z"}],
              "kopf": {"progress": {}}}  # kopf's own bookkeeping is ignored
    run = parse_training_run({**TRAINING, "status": status})
    assert run.status.last_checkpoint.step == 500 and run.status.start_time.year == 2025
    written = TrainingRunStatus(phase="Preempted", current_pod="petfinder-adoption-3", preemptions=2)
    assert written.model_dump(exclude_none=True, exclude_defaults=True) == {
        "phase": "Preempted", "currentPod": "petfinder-adoption-3", "preemptions": 2}
    refused_status = refused(parse_training_run, {**TRAINING, "status": {"phase": "Sleeping"}})
    assert "status.phase" in refused_status


# (edits, field path pydantic names, whether the CRD's openAPIV3Schema refuses it too; False means
# a CEL rule does, which the test checks is present at that field with the same message). Each case
# breaks exactly one thing: tests/test_cel_rules.py evaluates the CEL rules on them too.
TRAINING_CASES = {
    "bad enum": ([(("spec", "task", "problemType"), "binaryy")], "spec.task.problemType", True),
    "negative interval": ([(("spec", "checkpoint", "intervalSteps"), -5)], "spec.checkpoint.intervalSteps", True),
    "zero minutes": ([(("spec", "checkpoint", "intervalMinutes"), 0)], "spec.checkpoint.intervalMinutes", True),
    "unknown hyperparameter": ([(("spec", "hyperparameters", "optim.lrr"), 1e-3)],
                               "spec.hyperparameters.optim.lrr", None),
    "bad hyperparameter value": ([(("spec", "hyperparameters", "optim.lr"), "fast")],
                                 "spec.hyperparameters.optim.lr", None),
    "unknown spec field": ([(("spec", "colour"), "blue")], "spec.colour", True),
    "snake_case field": ([(("spec", "task", "problem_type"), "binary")], "spec.task.problem_type", True),
    "bad data uri": ([(("spec", "data", "train"), "data/train.json")], "spec.data.train", True),
    "bad duration": ([(("spec", "timeLimit"), "2 hours")], "spec.timeLimit", True),
    "empty duration": ([(("spec", "timeLimit"), "")], "spec.timeLimit", True),
    "bad quantity": ([(("spec", "resources", "memory"), "lots")], "spec.resources.memory", True),
    "bad toleration": ([(("spec", "resources", "tolerations"), [{"effect": "NoWay"}])],
                       "spec.resources.tolerations[0].effect", True),
    "negative gpus": ([(("spec", "resources", "gpus"), -1)], "spec.resources.gpus", True),
    "missing train": ([(("spec", "data", "train"), DELETE)], "spec.data.train", True),
    "wrong apiVersion": ([(("apiVersion",), "kontinue.dev/v1")], "apiVersion", None),
    "no name": ([(("metadata", "name"), DELETE)], "metadata.name", None),
    "s3 without secretRef": ([(("spec", "checkpoint", "secretRef"), DELETE)], "spec.checkpoint", False),
    "continueFrom with both": ([(("spec", "model"), DELETE),
                                (("spec", "continueFrom"), {"trainingRun": "a", "modelUri": "s3://models/a"})],
                               "spec.continueFrom", False),
    "no backbone": ([(("spec", "model"), {})], "spec.model", False),
    "model and continueFrom": ([(("spec", "continueFrom"), {"trainingRun": "a"})], "spec", False),
    "neither model nor continueFrom": ([(("spec", "model"), DELETE)], "spec", False),
    "no label": ([(("spec", "task", "label"), DELETE)], "spec.task", False),
}


def _check_refused(parse, document, path, by_schema):
    problems = refused(parse, document)
    assert path in problems, problems
    schema_paths = [problem.path for problem in schema_problems(document)]
    if by_schema:
        assert schema_paths and all(path.startswith(p) for p in schema_paths), schema_paths
    elif by_schema is False:  # a CEL rule with the same message sits at that field
        node = crd_schema(document["kind"])
        for key in path.split("."):
            node = node["properties"][key]
        assert problems[path] in [rule["message"] for rule in node["x-kubernetes-validations"]]
        assert schema_paths == []


@pytest.mark.parametrize("edits, path, by_schema", TRAINING_CASES.values(), ids=TRAINING_CASES)
def test_invalid_training_runs_are_refused_with_the_field_named(edits, path, by_schema):
    _check_refused(parse_training_run, changed(TRAINING, *edits), path, by_schema)


TRANSFER_CASES = {
    "source with both": ([(("spec", "source", "modelUri"), "s3://models/sst")], "spec.source", False),
    "source with neither": ([(("spec", "source"), {})], "spec.source", False),
    "bad backbone": ([(("spec", "backbones"), ["bert_text"])], "spec.backbones[0]", True),
    "empty label": ([(("spec", "task", "label"), "")], "spec.task.label", True),
    "no label": ([(("spec", "task", "label"), DELETE)], "spec.task", False),
    "no backbone": ([(("spec", "model"), {})], "spec.model", False),
    "s3 without secretRef": ([(("spec", "checkpoint", "storage"), "s3://checkpoints/kontinue")],
                             "spec.checkpoint", False),
}


@pytest.mark.parametrize("edits, path, by_schema", TRANSFER_CASES.values(), ids=TRANSFER_CASES)
def test_invalid_transfer_runs_are_refused_with_the_field_named(edits, path, by_schema):
    _check_refused(parse_transfer_run, changed(TRANSFER, *edits), path, by_schema)


VOLUME = {"name": "data", "claimName": "datasets", "mountPath": "/data", "readOnly": True}
# (volumes, field path, words of the message, how the CRD refuses it: "schema" for its
# openAPIV3Schema, a CEL message at that field, or "map" for its list-map key)
VOLUME_CASES = {
    "name not a label": ([{**VOLUME, "name": "Data_1"}], "spec.volumes[0].name", "DNS-1123 label", "schema"),
    "reserved name": ([{**VOLUME, "name": "scratch"}], "spec.volumes[0].name", "trainer pod's own volumes", "CEL"),
    "claim not a subdomain": ([{**VOLUME, "claimName": "my_claim"}], "spec.volumes[0].claimName",
                              "DNS-1123 subdomain", "schema"),
    "relative mountPath": ([{**VOLUME, "mountPath": "data"}], "spec.volumes[0].mountPath", "absolute path", "schema"),
    "root mountPath": ([{**VOLUME, "mountPath": "/"}], "spec.volumes[0].mountPath", "other than /", "schema"),
    "mountPath with ..": ([{**VOLUME, "mountPath": "/data/../etc"}], "spec.volumes[0].mountPath", "..", "schema"),
    "reserved mountPath": ([{**VOLUME, "mountPath": "/tmp"}], "spec.volumes[0].mountPath", "/tmp", "CEL"),
    "under a reserved path": ([{**VOLUME, "mountPath": "/scratch/data"}], "spec.volumes[0].mountPath",
                              "lie under", "CEL"),
    "above a reserved path": ([{**VOLUME, "mountPath": "/dev"}], "spec.volumes[0].mountPath", "contain", "CEL"),
    "absolute subPath": ([{**VOLUME, "subPath": "/nlp"}], "spec.volumes[0].subPath", "relative path", "schema"),
    "duplicate names": ([VOLUME, {**VOLUME, "mountPath": "/runs"}], "spec.volumes[1].name",
                        "names must be unique", "map"),
    "same mountPath": ([VOLUME, {**VOLUME, "name": "runs"}], "spec.volumes[1].mountPath",
                       "spec.volumes[0].mountPath (/data); mountPaths must be unique", "CEL"),
    "nested mountPaths": ([{**VOLUME, "mountPath": "/data/runs"}, {**VOLUME, "name": "runs"}],
                          "spec.volumes[1].mountPath", "not nested in one another", "CEL"),
    "too many": ([{**VOLUME, "name": f"v{i}", "mountPath": f"/v{i}"} for i in range(17)], "spec.volumes",
                 "at most 16", "schema"),
}


def crd_node(kind, path):
    """The CRD schema node of a field path such as spec.volumes[1].mountPath."""
    node = crd_schema(kind)
    for key in path.replace("[", ".[").split("."):
        node = node["items"] if key.startswith("[") else node["properties"][key]
    return node


@pytest.mark.parametrize("volumes, path, words, crd", VOLUME_CASES.values(), ids=VOLUME_CASES)
def test_invalid_volumes_are_refused_with_the_field_named(volumes, path, words, crd):
    document = changed(TRANSFER, (("spec", "volumes"), volumes))
    problems = refused(parse_transfer_run, document)
    assert list(problems) == [path] and words in problems[path], problems
    schema_paths = [problem.path for problem in schema_problems(document)]
    if crd == "schema":
        assert schema_paths == [path], schema_paths
        return
    assert schema_paths == []
    if crd == "map":
        assert crd_node("TransferRun", "spec.volumes")["x-kubernetes-list-map-keys"] == ["name"]
    else:  # the same rule as CEL, at the field or (for rules across items) at the list
        rules = [*crd_node("TransferRun", path).get("x-kubernetes-validations", []),
                 *crd_node("TransferRun", "spec.volumes")["x-kubernetes-validations"]]
        assert any(rule["message"] in problems[path] for rule in rules), (rules, problems)


def test_volumes_parse_with_their_defaults():
    data, checkpoints = parse_transfer_run(TRANSFER).spec.volumes
    assert (data.name, data.claim_name, data.mount_path, data.sub_path, data.read_only) == \
        ("datasets", "datasets", "/data", "nlp", True)
    assert (checkpoints.sub_path, checkpoints.read_only) == (None, False)
    assert parse_training_run(TRAINING).spec.volumes == []
    volumes = crd_node("TrainingRun", "spec.volumes")
    assert volumes["x-kubernetes-list-type"] == "map" and volumes["maxItems"] == 16


def test_families_and_problem_types_the_trainer_cannot_run_are_refused_by_pydantic_and_the_crd():
    """The API accepts exactly what kontinue.api.families says the trainer runs."""
    for kind in ("TrainingRun", "TransferRun"):
        assert sorted(crd_node(kind, "spec.model")["properties"]) == sorted(
            FAMILIES[name].spec_field for name in SPEC_FAMILIES)
        assert tuple(crd_node(kind, "spec.task.problemType")["enum"]) == PROBLEM_TYPES
    if OBJECT_DETECTION not in PROBLEM_TYPES:  # until the detection family lands
        problems = refused(parse_transfer_run, changed(TRANSFER, (("spec", "task"), {"problemType": OBJECT_DETECTION}),
                                                       (("spec", "model"), {"mmdetImage": {"checkpoint": "x"}})))
        assert "problemType" in str(problems) and problems["spec.model.mmdetImage"] == "unknown field"
    with pytest.raises(SpecError, match=r"model\.names: \['vit_image'\] not supported by this trainer"):
        parse_training_run(changed(TRAINING, (("spec", "hyperparameters", "model.names"), ["vit_image"])))


def test_every_problem_is_reported_at_once():
    problems = refused(parse_training_run, changed(
        TRAINING, (("spec", "task", "problemType"), "binaryy"), (("spec", "hyperparameters", "optim.lrr"), 1),
        (("spec", "hyperparameters", "optim.max_epochs"), 0), (("spec", "colour"), 1)))
    assert set(problems) == {"spec.task.problemType", "spec.hyperparameters.optim.lrr",
                             "spec.hyperparameters.optim.max_epochs", "spec.colour"}
    assert "did you mean 'optim.lr'" in problems["spec.hyperparameters.optim.lrr"]
    with pytest.raises(SpecError, match=r"(?s)TrainingRun/petfinder-adoption.*spec\.colour: unknown field"):
        parse_training_run(changed(TRAINING, (("spec", "colour"), 1)))


def test_effective_hyperparameters_merge_spec_fields():
    effective = parse_training_run(TRAINING).spec.effective_hyperparameters()
    assert effective == {
        "optim.lr": 2.0e-5, "optim.max_epochs": 5, "env.per_gpu_batch_size": 16, "env.precision": "bf16-mixed",
        "model.names": ["hf_text", "timm_image", "fusion_mlp"],
        "model.hf_text.checkpoint_name": "google/electra-small-discriminator", "model.hf_text.max_text_len": 256,
        "model.timm_image.checkpoint_name": "swin_tiny_patch4_window7_224",
        "env.checkpoint_every_n_steps": 500, "env.checkpoint_every_n_minutes": 7.5, "env.num_gpus": 1}
    validate_hyperparameters(effective)
    implied_names = parse_training_run(changed(TRAINING, (("spec", "hyperparameters"), {})))
    assert implied_names.spec.effective_hyperparameters()["model.names"] == [
        "hf_text", "timm_image", "numerical_mlp", "categorical_mlp", "fusion_mlp"]
    continued = parse_training_run(CONTINUED).spec.effective_hyperparameters()
    assert continued == {"env.num_gpus": 1}
    transfer = parse_transfer_run(TRANSFER).spec.effective_hyperparameters()
    assert "model.names" not in transfer and transfer["env.checkpoint_every_n_minutes"] == 5


def test_repeating_a_spec_field_in_hyperparameters_is_fine_when_equal():
    run = parse_training_run(changed(TRAINING, (("spec", "hyperparameters", "env.num_gpus"), 1),
                                     (("spec", "hyperparameters", "model.hf_text.max_text_len"), 256)))
    assert run.spec.effective_hyperparameters()["model.hf_text.max_text_len"] == 256


@pytest.mark.parametrize("key, value, field", [
    ("model.hf_text.checkpoint_name", "bert-base-uncased", "spec.model.hfText.checkpoint"),
    ("env.num_gpus", 2, "spec.resources.gpus"),
    ("env.checkpoint_every_n_steps", 100, "spec.checkpoint.intervalSteps"),
    ("model.names", ["hf_text"], "spec.model"),
])
def test_conflicting_hyperparameters_name_both_fields(key, value, field):
    problems = refused(parse_training_run, changed(TRAINING, (("spec", "hyperparameters", key), value)))
    assert field in problems[f"spec.hyperparameters.{key}"]


def test_load_manifest(tmp_path):
    path = MANIFESTS / "valid-transferrun.yaml"
    assert load_manifest(path) == load_manifest(str(path)) == load_manifest(path.read_text())
    with pytest.raises(SpecError, match="found 2"):
        load_manifest(MANIFESTS / "valid-trainingrun.yaml")
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    with pytest.raises(SpecError):
        load_manifest(tmp_path / "bad.yaml")


def test_the_api_and_its_family_registry_import_without_torch():
    """`kontinue validate` and the operator decide what the trainer runs without loading torch."""
    import subprocess
    import sys

    code = ("import sys, kontinue.api, kontinue.api.families as f; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(sorted(f.FAMILIES))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "mmdet_image" in result.stdout and "timm_image" in result.stdout
