"""Which model families and problem types this trainer runs, without importing torch.

The API (pydantic models, the CRD, `kontinue validate`) and the trainer's Predictor consult this
one table, so nothing is accepted that the trainer cannot run. Each family's builder lives in the
module named here and registers itself under the same prefix (AutoMM's names).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

BINARY, MULTICLASS, REGRESSION, OBJECT_DETECTION = "binary", "multiclass", "regression", "object_detection"
PREDICTION = (BINARY, MULTICLASS, REGRESSION)
COLUMN_ROLES = ("text", "image_path", "image_bytes", "numerical", "categorical")  # AutoMM's column types


@dataclass(frozen=True)
class Family:
    prefix: str                      # AutoMM's model prefix, the dump folder's name
    spec_field: str | None           # its field under spec.model (None: added from the data's columns)
    modality: str                    # the column role it claims
    problem_types: tuple[str, ...]
    module: str                      # where its builder registers itself
    requires: tuple[str, ...] = ()   # importable packages it needs beyond the base install
    extra: str | None = None         # the install extra that brings them
    dumped: bool = False             # dump_model writes it (AutoMM skips tabular towers)

    def installed(self) -> bool:
        return all(importlib.util.find_spec(name) is not None for name in self.requires)


FAMILIES: dict[str, Family] = {family.prefix: family for family in (
    Family("hf_text", "hfText", "text", PREDICTION, "kontinue.trainer.backbones.hf_text", dumped=True),
    Family("timm_image", "timmImage", "image", PREDICTION, "kontinue.trainer.backbones.timm_image", dumped=True),
    Family("mmdet_image", "mmdetImage", "image", (OBJECT_DETECTION,), "kontinue.trainer.backbones.mmdet_image",
           requires=("mmdet", "mmcv", "mmengine"), extra="detection", dumped=True),
    Family("numerical_mlp", None, "numerical", PREDICTION, "kontinue.trainer.backbones.tabular"),
    Family("categorical_mlp", None, "categorical", PREDICTION, "kontinue.trainer.backbones.tabular"),
)}
SPEC_FAMILIES: tuple[str, ...] = tuple(name for name, family in FAMILIES.items() if family.spec_field)
DUMPED_FAMILIES: tuple[str, ...] = tuple(name for name, family in FAMILIES.items() if family.dumped)
TABULAR_FAMILIES: tuple[str, ...] = ("numerical_mlp", "categorical_mlp")
FUSION_HEADS: tuple[str, ...] = ("fusion_mlp",)
PROBLEM_TYPES: tuple[str, ...] = tuple(dict.fromkeys(p for f in FAMILIES.values() for p in f.problem_types))
METRICS: dict[str, tuple[str, ...]] = {
    BINARY: ("accuracy", "f1", "roc_auc", "log_loss"),
    MULTICLASS: ("accuracy", "f1", "log_loss"),
    REGRESSION: ("rmse", "mae", "r2", "pearsonr", "spearmanr"),
    OBJECT_DETECTION: ("map", "map_50"),
}
METRIC_ALIASES = {"acc": "accuracy"}
SUPPORTED_METRICS: tuple[str, ...] = tuple(dict.fromkeys(
    [alias for alias, name in METRIC_ALIASES.items() if any(name in METRICS[p] for p in PROBLEM_TYPES)]
    + [m for p in PROBLEM_TYPES for m in METRICS[p]]))


def family_of(name: str) -> Family | None:
    """The family of a model name; a repeated family carries a numeric suffix (timm_image_1)."""
    base, _, suffix = name.rpartition("_")
    return FAMILIES.get(name) or (FAMILIES.get(base) if suffix.isdigit() else None)


def unsupported_model_names(names: list[str]) -> list[str]:
    """Names in model.names that are neither a family of this trainer nor a fusion head."""
    return [name for name in names if family_of(name) is None and name not in FUSION_HEADS]


def missing_install(name: str) -> str | None:
    """Why family `name` cannot run in this installation, or None when it can."""
    family = family_of(name)
    if family is None or family.installed():
        return None
    return f"{family.prefix} needs {', '.join(family.requires)}: install kontinue[{family.extra}]"
