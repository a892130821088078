"""Which spec a run directory belongs to: the fields that change what training produces, and one
digest over them. The CRD (transition rules), the operator (a spec edited mid-run) and the trainer
(a re-created run meeting an old directory) all decide from these, defined once here."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel

# spec fields whose change would silently change the result of a run that already started;
# the others (maxPreemptions, backoffLimit, deleteRunDirectory, ...) may change at any time.
IMMUTABLE_FIELDS = ("task", "data", "model", "hyperparameters", "seed", "resources.gpus",
                    "continueFrom", "source", "backbones", "checkpoint.storage", "timeLimit")


def canonical(spec: BaseModel) -> dict[str, Any]:
    """A parsed spec as the digest sees it: what the user set, defaults and nulls left out, so that
    writing a default or leaving it out, or a later version adding a field with a default, gives
    the same digest (a started run is never refused its own directory after an upgrade)."""
    return spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude_defaults=True)


def _at(spec: dict[str, Any], dotted: str) -> Any:
    value: Any = spec
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def immutable_part(spec: dict[str, Any]) -> dict[str, Any]:
    """The immutable fields of a spec (camelCase, as in the resource), absent ones left out."""
    spec = spec if isinstance(spec, dict) else {}
    return {name: value for name in IMMUTABLE_FIELDS if (value := _at(spec, name)) is not None}


def spec_digest(spec: BaseModel | dict[str, Any]) -> str:
    """sha256 over the immutable fields of a parsed spec (or of its `canonical` form), stable
    across key order."""
    spec = canonical(spec) if isinstance(spec, BaseModel) else spec
    text = json.dumps(immutable_part(spec), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()
