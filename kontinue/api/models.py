"""Pydantic models of the TrainingRun and TransferRun resources: the single source of truth.

The CRDs in `crds/` are generated from these classes (`kontinue crds`), so every field's
`description` is what `kubectl explain` shows, and every cross-field rule is written once as a
`Rule`: as CEL for the API server and as a Python check for pydantic.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema,
                      field_validator, model_validator)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError

from kontinue.api.families import (COLUMN_ROLES, FAMILIES, FUSION_HEADS, OBJECT_DETECTION, PROBLEM_TYPES, SPEC_FAMILIES,
                                    SUPPORTED_METRICS, TABULAR_FAMILIES)
from kontinue.api.hyperparameters import HYPERPARAMETERS, hyperparameter_problems

GROUP = "kontinue.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# The families a spec can name, as this trainer runs them (kontinue.api.families), in AutoMM's order
Backbone = Literal[SPEC_FAMILIES]  # type: ignore[valid-type]
BACKBONES: tuple[str, ...] = SPEC_FAMILIES
# The trainer pod's own emptyDir volumes, name -> mount path (kontinue.operator.pods mounts them):
# spec.volumes may not use these names, nor mount at, under or above these paths.
RESERVED_VOLUMES = {"scratch": "/scratch", "tmp": "/tmp", "dshm": "/dev/shm"}
MAX_VOLUMES = 16  # keeps the CRD's CEL rules within the API server's cost budget


def path_within(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies under it, by whole components (/data2 is not in /data)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _errors(errors: list[tuple[tuple, str, str, Any]]) -> ValidationError:
    """Several errors at once, each at its own location (pydantic prefixes the parent's)."""
    return ValidationError.from_exception_data("kontinue", [
        InitErrorDetails(type=PydanticCustomError(kind, message), loc=loc, input=value)
        for loc, kind, message, value in errors])


@dataclass(frozen=True)
class Rule:
    """A validation rule, written once as CEL (API server) and once in Python (pydantic)."""
    cel: str
    message: str
    holds: Callable[[Any], bool]


def _string(regex: str, expected: str, *rules: Rule, **schema: Any) -> Any:
    """A str checked against `regex` (and min/maxLength), then `rules` on the value itself, with
    readable messages; all of it goes into the CRD."""
    compiled = re.compile(regex)

    def check(value: Any) -> Any:
        if isinstance(value, str) and (not compiled.fullmatch(value) or len(value) < schema.get("minLength", 0)
                                       or len(value) > schema.get("maxLength", len(value))):
            raise PydanticCustomError("pattern", f"must be {expected}")
        for rule in rules:
            if isinstance(value, str) and not rule.holds(value):
                raise PydanticCustomError("pattern", rule.message)
        return value
    if rules:
        schema["x-kubernetes-validations"] = [{"rule": r.cel, "message": r.message} for r in rules]
    return Annotated[str, BeforeValidator(check),
                     WithJsonSchema({"type": "string", "pattern": regex, **schema})]


_BUCKET = r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
DataUri = _string(rf"^({_BUCKET}/|file:///|/).+\.(parquet|pq|csv|json)$",
                  "s3://bucket/key, file:///path or /absolute/path ending in .parquet, .pq, .csv or .json (COCO)")
DirectoryUri = _string(rf"^({_BUCKET}(/.*)?|file:///.*|/.*)$",
                       "s3://bucket[/prefix], file:///path or /absolute/path")
# minLength 2 rules out "" without a lookahead (RE2, which the API server uses, has none).
Duration = _string(r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$", 'a duration such as "90s", "30m" or "1h30m"',
                   minLength=2)
_QUANTITY = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
             r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")


def _quantity(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (
            isinstance(value, str) and not re.fullmatch(_QUANTITY, value)):
        raise PydanticCustomError("quantity", 'must be a Kubernetes quantity such as 2, "500m" or "16Gi"')
    return value


Quantity = Annotated[int | str, BeforeValidator(_quantity), WithJsonSchema(
    {"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": _QUANTITY,
     "x-kubernetes-int-or-string": True})]

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_COMPONENT = r"([^/.][^/]*|\.[^/.][^/]*|\.\.[^/]+)"  # a path component other than . and ..
_RESERVED_NAMES, _RESERVED_PATHS = list(RESERVED_VOLUMES), list(RESERVED_VOLUMES.values())


def _one_of(words: list[str]) -> str:
    return f"{', '.join(words[:-1])} or {words[-1]}"


VolumeName = _string(
    rf"^{_LABEL}$", "a DNS-1123 label: lowercase letters, digits and -, at most 63 characters",
    Rule(f"!(self in {_RESERVED_NAMES})",
         f"must not be {_one_of(_RESERVED_NAMES)}: the trainer pod's own volumes have those names",
         lambda name: name not in RESERVED_VOLUMES), maxLength=63)
ClaimName = _string(rf"^{_LABEL}(\.{_LABEL})*$",
                    "a DNS-1123 subdomain: lowercase letters, digits, - and ., at most 253 characters",
                    maxLength=253)
MountPath = _string(
    rf"^(/{_COMPONENT})+$", "an absolute path other than /, without a trailing / or . and .. components",
    Rule(f"!{_RESERVED_PATHS}.exists(p, self == p || self.startsWith(p + '/') || p.startsWith(self + '/'))",
         f"must not be, lie under or contain {_one_of(_RESERVED_PATHS)}: the trainer pod mounts its own "
         "volumes there",
         lambda path: not any(path_within(path, p) or path_within(p, path) for p in _RESERVED_PATHS)),
    maxLength=256)
SubPath = _string(rf"^{_COMPONENT}(/{_COMPONENT})*$", "a relative path without . and .. components")


def _exactly_one(*values: Any) -> bool:
    return sum(value is not None for value in values) == 1


def _add_rules(schema: dict[str, Any], cls: type) -> None:
    if cls.rules:
        schema["x-kubernetes-validations"] = [{"rule": r.cel, "message": r.message} for r in cls.rules]


class _Model(BaseModel):
    """Spec objects: camelCase keys only and unknown keys refused, exactly like the CRD."""
    model_config = ConfigDict(alias_generator=to_camel, extra="forbid", serialize_by_alias=True,
                              json_schema_extra=_add_rules)
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        broken = [r.message for r in self.rules if not r.holds(self)]
        if broken:
            raise _errors([((), "rule", message, None) for message in broken])
        return self


class _Status(_Model):
    """Status objects: written by the operator, which may use snake_case names; extra keys are
    ignored so a status written by another operator version still parses."""
    model_config = ConfigDict(extra="ignore", validate_by_name=True, validate_by_alias=True)


# ---------------------------------------------------------------------------------------- spec

class TaskSpec(_Model):
    """What to predict."""
    label: str | None = Field(None, min_length=1, description=(
        "Column holding the target. Required unless problemType is object_detection, whose boxes are in "
        "the column rois, else label: [[x1, y1, x2, y2, class], ...] per image."))
    problem_type: Literal[PROBLEM_TYPES] | None = Field(  # type: ignore[valid-type]
        None, description="Kind of problem; inferred from the label column when unset.")
    eval_metric: Literal[SUPPORTED_METRICS] | None = Field(  # type: ignore[valid-type]
        None, description="Metric used for validation, early stopping and model selection.")
    column_types: dict[str, Literal[COLUMN_ROLES]] = Field(  # type: ignore[valid-type]
        default_factory=dict, description=(
            "Role of a column by name (text, image_path, image_bytes, numerical or categorical); the roles of "
            "the others are inferred from the data, as AutoMM does."))
    # a detector's boxes need no label column; the other problem types predict one
    rules = (Rule("has(self.label)" + (" || (has(self.problemType) && self.problemType == 'object_detection')"
                                       if OBJECT_DETECTION in PROBLEM_TYPES else ""),
                  "task.label is required" + (" unless task.problemType is object_detection"
                                              if OBJECT_DETECTION in PROBLEM_TYPES else ""),
                  lambda t: t.label is not None or t.problem_type == OBJECT_DETECTION),)


class DataSpec(_Model):
    """Tables to train on (parquet or csv, chosen by the file extension)."""
    train: DataUri = Field(description=(
        "Training table: s3://bucket/key, or file:///path or /path on a volume of spec.volumes."))
    validation: DataUri | None = Field(
        None, description="Validation table; a split of train is held out when unset.")
    test: DataUri | None = Field(None, description="Table scored once after training.")


class HfTextSpec(_Model):
    """A Hugging Face transformers text backbone."""
    checkpoint: str = Field(min_length=1, description=(
        "A transformers model name or a directory URI (for example a dump's hf_text/)."))
    max_text_len: int | None = Field(None, ge=1, description="Tokens kept per text; longer texts are cut.")


class TimmImageSpec(_Model):
    """A timm image backbone over the image columns."""
    checkpoint: str = Field(min_length=1, description=(
        "A timm architecture name (random weights: nothing is downloaded) or a directory URI of a dump's "
        "timm_image/ (its trained weights)."))
    image_size: int | None = Field(None, ge=8, le=4096, description=(
        "Image side in pixels; the architecture's own input size when unset."))


class MmdetImageSpec(_Model):
    """An MMDetection detector over the image column, for object_detection."""
    checkpoint: str = Field(min_length=1, description=(
        "An MMDetection config name (its architecture with random weights: nothing is downloaded), a .json "
        "or .yaml config file, or a directory URI of a dump's mmdet_image/ (its trained weights)."))
    image_size: int | None = Field(None, ge=8, le=4096, description=(
        "Images are resized to fit a square of this side, keeping their aspect ratio; the config's test "
        "scale when unset."))


class ModelSpec(_Model):
    """Backbones to build; with several (and any numerical or categorical columns) a fusion MLP head
    combines them."""
    hf_text: HfTextSpec | None = Field(None, description="Text backbone (model.hf_text in AutoMM).")
    timm_image: TimmImageSpec | None = Field(None, description="timm image backbone (model.timm_image).")
    mmdet_image: MmdetImageSpec | None = Field(
        None, description="MMDetection detector (model.mmdet_image), for object_detection.")
    rules = (Rule(" || ".join(f"has(self.{FAMILIES[name].spec_field})" for name in BACKBONES),
                  f"model needs at least one of {', '.join(FAMILIES[name].spec_field for name in BACKBONES)}",
                  lambda m: any(getattr(m, name) for name in BACKBONES)),)

    def backbones(self) -> list[str]:
        """AutoMM prefixes of the backbones given, in AutoMM's order."""
        return [name for name in BACKBONES if getattr(self, name) is not None]


class SecretRef(_Model):
    """A Secret in the run's namespace."""
    name: str = Field(min_length=1, description=(
        "Secret name; its keys endpoint, accessKey, secretKey (and optionally region) configure S3."))


class CheckpointSpec(_Model):
    """Where and how often training state is saved; SIGTERM (preemption) always saves."""
    storage: DirectoryUri = Field(description=(
        "s3://bucket/prefix, or file:///path or /path on a writable volume of spec.volumes; the run "
        "directory is <storage>/<namespace>/<name>/."))
    secret_ref: SecretRef | None = Field(None, description="S3 endpoint and credentials; required for s3://.")
    interval_steps: int | None = Field(None, ge=1, description="Also save every this many optimizer steps.")
    interval_minutes: float | None = Field(None, gt=0, description="Also save at least this often (minutes).")
    keep: int | None = Field(None, ge=1, le=100, description=(
        "Resume points kept, newest first (default 2): older ones are the fallback when the newest is damaged."))
    rules = (Rule("!self.storage.startsWith('s3://') || has(self.secretRef)",
                  "checkpoint.secretRef is required when checkpoint.storage is an s3:// URI",
                  lambda c: not c.storage.startswith("s3://") or c.secret_ref is not None),)


class VolumeSpec(_Model):
    """A PersistentVolumeClaim mounted into the trainer pod."""
    name: VolumeName = Field(description="Volume name in the pod; unique among spec.volumes.")
    claim_name: ClaimName = Field(description="PersistentVolumeClaim in the run's namespace.")
    mount_path: MountPath = Field(description=(
        "Where the trainer sees the claim, such as /data; not nested with another volume's mountPath."))
    sub_path: SubPath | None = Field(None, description="Directory inside the claim to mount instead of its root.")
    read_only: bool = Field(False, description=(
        "Mount read-only: fine for data, while checkpoint.storage needs a writable volume."))


_MOUNTS_APART = ("self.all(a, self.all(b, a.name == b.name || "
                 "!(a.mountPath == b.mountPath || a.mountPath.startsWith(b.mountPath + '/'))))")
_MOUNTS_APART_MESSAGE = "mountPaths must be unique and not nested in one another"


class Toleration(_Model):
    """A Kubernetes toleration for the trainer pod."""
    key: str | None = Field(None, description="Taint key; empty with operator Exists matches all taints.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default).")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class ResourcesSpec(_Model):
    """What the trainer pod asks for and where it may run."""
    gpus: int = Field(0, ge=0, description="GPUs (nvidia.com/gpu) for the pod; also AutoMM's env.num_gpus.")
    cpu: Quantity | None = Field(None, description='CPU request, a quantity such as 4 or "3500m".')
    memory: Quantity | None = Field(None, description='Memory request and limit, such as "16Gi".')
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the pod requires.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Taints the pod tolerates (spot nodes).")
    priority_class_name: str | None = Field(None, description="PriorityClass of the pod.")


class ModelSource(_Model):
    """A trained predictor: an earlier run of this namespace, or a predictor directory."""
    training_run: str | None = Field(None, min_length=1, description="Name of a TrainingRun in the same namespace.")
    model_uri: DirectoryUri | None = Field(None, description="URI of a predictor directory.")
    rules = (Rule("has(self.trainingRun) != has(self.modelUri)",
                  "give exactly one of trainingRun or modelUri",
                  lambda s: _exactly_one(s.training_run, s.model_uri)),)


class _RunSpec(_Model):
    """Fields shared by TrainingRun and TransferRun."""
    image: str | None = Field(None, description="Trainer image; the operator's default when unset.")
    task: TaskSpec = Field(description="What to predict.")
    data: DataSpec = Field(description="Tables to train on.")
    model: ModelSpec | None = Field(None, description="Backbones to build.")
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description=(
        "AutoMM hyperparameters by dotted key, such as optim.lr: 2.0e-5. "
        "Keys implied by other fields may be repeated only with the same value."),
        json_schema_extra={"properties": {key: {"description": f"{spec.description} Default: {json.dumps(spec.default)}."}
                                          for key, spec in HYPERPARAMETERS.items()}})
    time_limit: Duration | None = Field(None, description='Training time budget, such as "30m" or "1h30m".')
    seed: int = Field(0, ge=0, description="Random seed.")
    checkpoint: CheckpointSpec = Field(description="Where and how often training state is saved.")
    volumes: list[VolumeSpec] = Field(
        default_factory=list, max_length=MAX_VOLUMES, description=(
            "PersistentVolumeClaims mounted into the trainer pod: file paths in data and "
            "checkpoint.storage must lie on one of them (the pod's root filesystem is read-only)."),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                           "x-kubernetes-validations": [{"rule": _MOUNTS_APART, "message": _MOUNTS_APART_MESSAGE}]})
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pod resources and placement.")
    max_preemptions: int = Field(20, ge=0, description="Preemptions tolerated before the run fails.")
    backoff_limit: int = Field(3, ge=0, description="Failures (not preemptions) retried before the run fails.")
    dump_model: bool = Field(True, description="Dump the backbones (dump_model) when training succeeds.")
    delete_run_directory: bool = Field(False, description="Delete the run directory when the run is deleted.")

    @field_validator("hyperparameters")
    @classmethod
    def _check_hyperparameters(cls, value: dict[str, Any]) -> dict[str, Any]:
        problems = hyperparameter_problems(value)
        if problems:
            raise _errors([((p.key,), "hyperparameter", p.message, value[p.key]) for p in problems])
        return value

    @field_validator("volumes")
    @classmethod
    def _check_volumes(cls, volumes: list[VolumeSpec]) -> list[VolumeSpec]:
        errors = []
        for index, volume in enumerate(volumes):
            path = volume.mount_path
            for earlier, other in enumerate(volumes[:index]):
                if volume.name == other.name:
                    errors.append(((index, "name"), "rule",
                                   f"spec.volumes[{earlier}] has that name too; names must be unique", volume.name))
                if path_within(path, other.mount_path) or path_within(other.mount_path, path):
                    errors.append(((index, "mountPath"), "rule", f"{path} overlaps spec.volumes[{earlier}]"
                                   f".mountPath ({other.mount_path}); {_MOUNTS_APART_MESSAGE}", path))
        if errors:
            raise _errors(errors)
        return volumes

    @model_validator(mode="after")
    def _check_implied(self) -> Any:
        conflicts = [(("hyperparameters", key), "conflict",
                      f"{self.hyperparameters[key]!r} conflicts with {path} ({value!r}); set only one", value)
                     for key, (path, value) in self.implied_hyperparameters().items()
                     if key in self.hyperparameters and not _agree(key, self.hyperparameters[key], value)]
        if conflicts:
            raise _errors(conflicts)
        return self

    def implied_hyperparameters(self) -> dict[str, tuple[str, Any]]:
        """AutoMM keys that other spec fields set: key -> (field path, value)."""
        implied: dict[str, tuple[str, Any]] = {"env.num_gpus": ("spec.resources.gpus", self.resources.gpus)}
        if self.checkpoint.interval_steps is not None:
            implied["env.checkpoint_every_n_steps"] = (
                "spec.checkpoint.intervalSteps", self.checkpoint.interval_steps)
        if self.checkpoint.interval_minutes is not None:
            implied["env.checkpoint_every_n_minutes"] = (
                "spec.checkpoint.intervalMinutes", self.checkpoint.interval_minutes)
        if self.checkpoint.keep is not None:
            implied["env.checkpoint_keep"] = ("spec.checkpoint.keep", self.checkpoint.keep)
        for name in self.model.backbones() if self.model else ():
            implied[f"model.{name}.checkpoint_name"] = (
                f"spec.model.{to_camel(name)}.checkpoint", getattr(self.model, name).checkpoint)
        if self.model and self.model.hf_text and self.model.hf_text.max_text_len is not None:
            implied["model.hf_text.max_text_len"] = ("spec.model.hfText.maxTextLen", self.model.hf_text.max_text_len)
        for name in self.model.backbones() if self.model else ():
            size = getattr(getattr(self.model, name), "image_size", None)
            if size is not None:
                implied[f"model.{name}.image_size"] = (f"spec.model.{to_camel(name)}.imageSize", size)
        return implied

    def effective_hyperparameters(self, **context: Any) -> dict[str, Any]:
        """The user's hyperparameters plus those implied by other fields (validation has ruled out
        disagreements); `validate_hyperparameters` merges the result over the defaults.
        Checkpoint URIs (s3://...) are left for the trainer to fetch. `context` is what
        `implied_hyperparameters` needs beyond the spec (a TransferRun's source dumps)."""
        implied = {key: value for key, (_, value) in self.implied_hyperparameters(**context).items()}
        return {**implied, **self.hyperparameters}

    def time_limit_seconds(self) -> int | None:
        """`timeLimit` in seconds (None: no limit)."""
        if self.time_limit is None:
            return None
        hours, minutes, seconds = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", self.time_limit).groups()
        return int(hours or 0) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)


def _with_fusion(names: list[str]) -> list[str]:
    """model.names for these backbones: plus the towers for any numerical and categorical columns
    (left out when the data has none), all fused by an MLP head, as in AutoMM."""
    return names + list(TABULAR_FAMILIES) + list(FUSION_HEADS)


def _agree(key: str, given: Any, implied: Any) -> bool:
    """model.names agrees when it names the same backbones (towers and the fusion head are its choice)."""
    if key == "model.names":
        given, implied = ([name for name in names if name in BACKBONES] for names in (given, implied))
        return sorted(given) == sorted(implied)
    return given == implied


class TrainingRunSpec(_RunSpec):
    """Train a predictor (AutoMM fit), or keep training an existing one on new data."""
    continue_from: ModelSource | None = Field(None, description=(
        "Keep training this predictor (AutoGluon's continuous training, use case 1) instead of a new model."))
    rules = (Rule("has(self.model) != has(self.continueFrom)",
                  "give exactly one of model (a new predictor) or continueFrom (an existing one)",
                  lambda s: _exactly_one(s.model, s.continue_from)),)

    def implied_hyperparameters(self) -> dict[str, tuple[str, Any]]:
        implied = super().implied_hyperparameters()
        if self.model:
            names = self.model.backbones()
            implied["model.names"] = ("spec.model", _with_fusion(names))
        return implied


class TransferRunSpec(_RunSpec):
    """Start a new task from the backbones of a trained predictor (dump_model, use case 3)."""
    source: ModelSource = Field(description="The trained predictor whose backbones are dumped.")
    backbones: list[Backbone] | None = Field(
        None, min_length=1, description="Backbones taken from the source; all it has when unset.")
    model: ModelSpec | None = Field(None, description=(
        "Backbones to add; one given here replaces the source's backbone of the same kind."))

    def implied_hyperparameters(self, source_dumps: dict[str, str] | None = None) -> dict[str, tuple[str, Any]]:
        """As for a TrainingRun, plus the source's backbones taken, once the trainer has them on disk
        (`source_dumps`: backbone -> local dump directory); validation knows spec.model only."""
        if source_dumps is None:
            return super().implied_hyperparameters()
        implied = {f"model.{name}.checkpoint_name": ("spec.source", path) for name, path in source_dumps.items()}
        implied.update(super().implied_hyperparameters())  # spec.model replaces the source's backbone
        added = self.model.backbones() if self.model else []
        names = [name for name in BACKBONES if name in source_dumps or name in added]
        implied["model.names"] = ("spec.source", _with_fusion(names))
        return implied


# -------------------------------------------------------------------------------------- status

class CheckpointStatus(_Status):
    """A saved resume point."""
    uri: str | None = Field(None, description="Where the checkpoint is stored.")
    step: int | None = Field(None, description="Optimizer steps done.")
    epoch: int | None = Field(None, description="Epoch it was taken in.")
    sha256: str | None = Field(None, description="Digest of the checkpoint file.")
    time: datetime | None = Field(None, description="When it was written.")


class BestCheckpoint(_Status):
    """The best validation result so far."""
    uri: str | None = Field(None, description="Where its weights are stored.")
    score: float | None = Field(None, description="Validation score.")
    metric: str | None = Field(None, description="Metric the score is measured in.")


class Condition(_Status):
    """A Kubernetes-style condition."""
    type: str = Field(description="Condition type, such as Ready or Preempted.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(None, description="CamelCase reason for the last transition.")
    message: str | None = Field(None, description="Human-readable details.")
    last_transition_time: datetime | None = Field(None, description="When the status last changed.")
    observed_generation: int | None = Field(None, description="metadata.generation the condition is based on.")


class TrainingRunStatus(_Status):
    """Observed state, written by the operator."""
    phase: Literal["Pending", "Running", "Preempted", "Succeeded", "Failed"] | None = Field(
        None, description="Pending, Running, Preempted (waiting to resume), Succeeded or Failed.")
    attempt: int | None = Field(None, ge=0, description="Pods started so far.")
    preemptions: int | None = Field(None, ge=0, description="Pods lost to preemption or eviction.")
    failures: int | None = Field(None, ge=0, description="Pods that failed for other reasons.")
    current_pod: str | None = Field(None, description="Name of the trainer pod of this attempt.")
    pod_uid: str | None = Field(None, description="uid of the current pod once it was seen.")
    pod_reason: str | None = Field(None, description="Last observed state of the current pod.")
    pod_gone_time: datetime | None = Field(None, description=(
        "When the current pod was found gone with no last state; it counts as preempted after a grace period."))
    next_attempt_time: datetime | None = Field(None, description="When the next attempt may start (back-off).")
    preempted_time: datetime | None = Field(None, description="When the last preemption was seen.")
    warnings: list[str] = Field(default_factory=list, description="Warnings from the trainer, newest last.")
    last_checkpoint: CheckpointStatus | None = Field(None, description="Latest resume point.")
    best_checkpoint: BestCheckpoint | None = Field(None, description="Best validation result so far.")
    dumped_model_uri: str | None = Field(None, description="Where the backbones were dumped.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Latest metrics by name.")
    progress: str | None = Field(None, description='Progress for display, such as "42%".')
    progress_ratio: float | None = Field(None, ge=0, le=1, description="Progress as a fraction 0..1.")
    message: str | None = Field(None, description="Human-readable state.")
    start_time: datetime | None = Field(None, description="When the first pod started.")
    completion_time: datetime | None = Field(None, description="When the run succeeded or failed.")
    observed_generation: int | None = Field(None, description="metadata.generation last acted on.")
    spec_digest: str | None = Field(None, description=(
        "sha256 of the spec's immutable fields when the first attempt started; a run whose spec no longer "
        "matches it fails with SpecChanged."))
    spec_field_digests: dict[str, str] = Field(default_factory=dict, description=(
        "Short digest of each immutable field (such as resources.gpus) when the first attempt started, to name "
        "the fields that changed."))
    conditions: list[Condition] = Field(default_factory=list, description="Kubernetes-style conditions.",
                                        json_schema_extra={"x-kubernetes-list-type": "map",
                                                           "x-kubernetes-list-map-keys": ["type"]})


class TransferRunStatus(TrainingRunStatus):
    """Observed state, written by the operator."""
    source_dump_uri: str | None = Field(None, description="Where the source's backbones were dumped.")


# ------------------------------------------------------------------------------------ resources

class ObjectMeta(BaseModel):
    """Kubernetes metadata; keys other than these are kept as they are."""
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class _Resource(_Model):
    api_version: Literal["kontinue.dev/v1alpha1"] = Field(API_VERSION, description="kontinue.dev/v1alpha1.")
    kind: str
    metadata: ObjectMeta = Field(description="Standard object metadata.")
    plural: ClassVar[str]
    short_name: ClassVar[str]

    def run_directory(self) -> str:
        """`<storage>/<namespace>/<name>/`, where checkpoints, logs and the dump live."""
        storage = self.spec.checkpoint.storage.rstrip("/")
        return f"{storage}/{self.metadata.namespace or 'default'}/{self.metadata.name}/"


class TrainingRun(_Resource):
    """Trains an AutoMM-style predictor on preemptible nodes, resuming from checkpoints."""
    kind: Literal["TrainingRun"] = Field("TrainingRun", description="TrainingRun.")
    spec: TrainingRunSpec = Field(description="What to train and how.")
    status: TrainingRunStatus | None = Field(None, description="Observed state, written by the operator.")
    plural = "trainingruns"
    short_name = "ktr"


class TransferRun(_Resource):
    """Starts a new task from the dumped backbones of a trained predictor."""
    kind: Literal["TransferRun"] = Field("TransferRun", description="TransferRun.")
    spec: TransferRunSpec = Field(description="Where the backbones come from and what to train.")
    status: TransferRunStatus | None = Field(None, description="Observed state, written by the operator.")
    plural = "transferruns"
    short_name = "kxr"


RESOURCES: dict[str, type[TrainingRun] | type[TransferRun]] = {"TrainingRun": TrainingRun, "TransferRun": TransferRun}
