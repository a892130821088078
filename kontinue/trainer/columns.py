"""Column roles, inferred as AutoMM infers them (text, image path or bytes, numerical, categorical)
unless set explicitly; each backbone family claims the columns of its modality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from kontinue.api.contract import InvalidInput
from kontinue.api.families import COLUMN_ROLES as ROLES

TEXT, IMAGE_PATH, IMAGE_BYTES, NUMERICAL, CATEGORICAL = ROLES
MODALITY = {TEXT: "text", IMAGE_PATH: "image", IMAGE_BYTES: "image", NUMERICAL: "numerical",
            CATEGORICAL: "categorical"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CATEGORICAL_MAX_CLASSES = 20     # AutoMM: a column with few distinct values is categorical
CATEGORICAL_MAX_RATIO = 0.1      # ... relative to the rows it has


def _sample(column: pd.Series, size: int = 200) -> list[Any]:
    return column.dropna().head(size).tolist()


def _looks_like_image_path(value: Any) -> bool:
    if not isinstance(value, str) or not value.strip():
        return False
    first = value.split(";")[0].strip()  # AutoMM separates several images of one cell with ";"
    if first.startswith("s3://"):
        return first.lower().endswith(IMAGE_SUFFIXES)
    local = first[len("file://"):] if first.startswith("file://") else first
    return local.lower().endswith(IMAGE_SUFFIXES) and Path(local).expanduser().is_file()


def _few_distinct(column: pd.Series) -> bool:
    distinct = column.nunique(dropna=True)
    return distinct <= CATEGORICAL_MAX_CLASSES and distinct <= max(2, CATEGORICAL_MAX_RATIO * column.notna().sum())


def infer_role(column: pd.Series) -> str | None:
    """The role of one column; None when it carries nothing a model can use (all missing)."""
    values = _sample(column)
    if not values:
        return None
    if pd.api.types.is_bool_dtype(column):
        return CATEGORICAL
    if pd.api.types.is_numeric_dtype(column):
        integral = pd.api.types.is_integer_dtype(column)
        return CATEGORICAL if integral and _few_distinct(column) else NUMERICAL
    if all(isinstance(v, (bytes, bytearray)) for v in values):
        return IMAGE_BYTES
    if all(_looks_like_image_path(v) for v in values):
        return IMAGE_PATH
    if _few_distinct(column.astype(str).where(column.notna())):
        return CATEGORICAL
    return TEXT


def column_roles(data: pd.DataFrame, exclude: list[str],
                 column_types: dict[str, str] | None = None) -> dict[str, str]:
    """Role of every column but `exclude` (the label); `column_types` overrides the inference."""
    column_types = dict(column_types or {})
    for name, role in column_types.items():
        if name not in data.columns:
            raise InvalidInput(f"column_types.{name}", f"no such column; columns are {list(data.columns)}")
        if role not in ROLES:
            raise InvalidInput(f"column_types.{name}", f"unknown column type {role!r}; use one of {list(ROLES)}")
    roles = {}
    for name in data.columns:
        if name in exclude:
            continue
        role = column_types.get(name) or infer_role(data[name])
        if role is not None:
            roles[name] = role
    return roles


def columns_of(roles: dict[str, str], modality: str) -> list[str]:
    return [name for name, role in roles.items() if MODALITY[role] == modality]
