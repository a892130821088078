"""Loading and checking TrainingRun / TransferRun manifests, naming every problem's field path."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from kontinue.api.crd import crd_schema
from kontinue.api.models import GROUP, RESOURCES, TrainingRun, TransferRun

_Resource = TypeVar("_Resource", bound=BaseModel)
# Error types whose message needs no "(got ...)": it says it already, or the input is a whole object.
_NO_INPUT = {"missing", "extra_forbidden", "hyperparameter", "conflict", "rule"}


@dataclass(frozen=True)
class Problem:
    path: str  # such as spec.checkpoint.intervalSteps or spec.hyperparameters.optim.lr
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """A manifest is invalid; `problems` lists every problem with its field path."""

    def __init__(self, problems: Iterable[Problem], subject: str = "manifest"):
        self.problems = list(problems)
        super().__init__(f"invalid {subject}:\n" + "\n".join(f"  {problem}" for problem in self.problems))


class _Loader(yaml.SafeLoader):
    """Timestamps stay strings, as in the JSON the API server sees."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def load_documents(text: str) -> list[Any]:
    """All documents of a multi-document YAML text, empty ones included as None."""
    return list(yaml.load_all(text, Loader=_Loader))


def field_path(loc: Iterable[str | int]) -> str:
    """("spec", "resources", "tolerations", 0, "effect") -> spec.resources.tolerations[0].effect"""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path


def _problems(error: ValidationError) -> list[Problem]:
    problems = []
    for detail in error.errors(include_url=False):
        message = "unknown field" if detail["type"] == "extra_forbidden" else detail["msg"]
        value = detail.get("input")
        if detail["type"] not in _NO_INPUT and isinstance(value, (str, int, float)):
            message += f" (got {value!r})"
        problems.append(Problem(field_path(detail["loc"]), message))
    return problems


def describe(document: Any) -> str:
    """KIND/NAME of a document, with ? for what it lacks."""
    if not isinstance(document, dict):
        return "?/?"
    metadata = document.get("metadata")
    return f"{document.get('kind', '?')}/{metadata.get('name', '?') if isinstance(metadata, dict) else '?'}"


def _parse(model: type[_Resource], document: Any) -> _Resource:
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise SpecError(_problems(error), describe(document)) from None


def parse_training_run(document: dict[str, Any]) -> TrainingRun:
    return _parse(TrainingRun, document)


def parse_transfer_run(document: dict[str, Any]) -> TransferRun:
    return _parse(TransferRun, document)


def is_kontinue(document: Any) -> bool:
    """Whether a document is meant as one of our resources (by kind, or by API group)."""
    return isinstance(document, dict) and (
        document.get("kind") in RESOURCES or str(document.get("apiVersion", "")).startswith(f"{GROUP}/"))


def parse_resource(document: Any) -> TrainingRun | TransferRun:
    """A TrainingRun or TransferRun, chosen by `kind`."""
    kind = document.get("kind") if isinstance(document, dict) else None
    if kind not in RESOURCES:
        raise SpecError([Problem("kind", f"must be one of {list(RESOURCES)}, got {kind!r}")])
    return _parse(RESOURCES[kind], document)


def load_manifest(path_or_text: str | Path) -> TrainingRun | TransferRun:
    """The one kontinue resource in a YAML file (a Path, or a str without newlines) or YAML text
    (a str with newlines); other documents, such as a Secret, are ignored."""
    try:
        text = path_or_text if isinstance(path_or_text, str) and "\n" in path_or_text \
            else Path(path_or_text).read_text()
        documents = [document for document in load_documents(text) if is_kontinue(document)]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise SpecError([Problem("", str(error))]) from error
    if len(documents) != 1:
        raise SpecError([Problem("", f"expected one TrainingRun or TransferRun, found {len(documents)}")])
    return parse_resource(documents[0])


def _strict(node: dict[str, Any]) -> dict[str, Any]:
    """Unknown keys are errors, as with kubectl's default (strict) server-side field validation."""
    node = dict(node)
    if "properties" in node:
        node["properties"] = {name: _strict(child) for name, child in node["properties"].items()}
        node["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            node[key] = _strict(node[key])
    return node


@cache
def _validator(kind: str) -> Any:
    # Imported here: jsonschema is a test/CLI dependency, not one of the operator's or trainer's.
    import jsonschema

    # Draft 4 reads OpenAPI v3's boolean exclusiveMinimum; x-kubernetes-* keys are ignored.
    return jsonschema.Draft4Validator(_strict(crd_schema(kind)))


def schema_problems(document: dict[str, Any]) -> list[Problem]:
    """What the CRD's openAPIV3Schema refuses (its CEL rules aside: the models enforce those)."""
    errors = _validator(document["kind"]).iter_errors(document)
    return sorted((Problem(field_path(error.absolute_path), error.message) for error in errors),
                  key=lambda problem: problem.path)


def _related(a: str, b: str) -> bool:
    """One path lies within the other (a required/unknown key is reported at its parent by jsonschema)."""
    short, long = sorted((a, b), key=len)
    return not short or long == short or long.startswith(short) and long[len(short)] in ".["


def document_problems(document: Any) -> list[Problem]:
    """Problems of a TrainingRun/TransferRun document: the models' first, then any the CRD schema
    alone finds (marked; they mean the models and the CRD have drifted apart)."""
    try:
        parse_resource(document)
        problems = []
    except SpecError as error:
        problems = error.problems
    if isinstance(document, dict) and document.get("kind") in RESOURCES:
        problems += [Problem(p.path, f"{p.message} (CRD schema)") for p in schema_problems(document)
                     if not any(_related(p.path, known.path) for known in problems)]
    return problems
