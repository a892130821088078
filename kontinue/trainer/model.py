"""Which models a predictor builds: AutoMM's selection of families by the data's column roles, new
from checkpoints or rebuilt from a run directory's assets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from kontinue.api.contract import InvalidInput
from kontinue.api.families import FUSION_HEADS, family_of
from kontinue.trainer.backbones import Backbone, builder_for, create_backbone
from kontinue.trainer.columns import MODALITY, columns_of
from kontinue.trainer.module import PredictorModule
from kontinue.trainer.problem import Problem

log = logging.getLogger("kontinue.trainer")


def select_models(names: list[str], roles: dict[str, str], problem_type: str) -> dict[str, list[str]]:
    """model name -> the columns it claims; a family with no column of its modality is left out."""
    chosen: dict[str, list[str]] = {}
    for name in names:
        family = family_of(name)
        if name in FUSION_HEADS or problem_type not in family.problem_types:
            continue
        columns = columns_of(roles, family.modality)
        if columns:
            builder_for(name)  # refuses a family this trainer cannot import (an extra not installed)
            chosen[name] = columns
        else:
            log.info("model %s left out: the data has no %s column", name, family.modality)
    if not any(problem_type in family_of(name).problem_types for name in names if name not in FUSION_HEADS):
        raise InvalidInput("hyperparameters.model.names", f"none of {names} can do {problem_type!r}")
    if not chosen:
        raise InvalidInput("data", f"no column any model can use: column roles are {roles}, "
                           f"model.names is {names}")
    claimed = {column for columns in chosen.values() for column in columns}
    for column, role in roles.items():
        if column not in claimed:
            log.warning("column %s (%s) is not used: model.names has no %s model", column, role, MODALITY[role])
    return chosen


def build_module(hyperparameters: dict[str, Any], problem: Problem, columns: dict[str, list[str]],
                 data: pd.DataFrame) -> PredictorModule:
    """A new model: each backbone from its checkpoint_name (random or dumped weights) and `data`."""
    backbones = {name: create_backbone(name, hyperparameters, cols, problem=problem, data=data) for name, cols in columns.items()}
    return PredictorModule(backbones, problem, hyperparameters)


def rebuild_module(hyperparameters: dict[str, Any], problem: Problem, columns: dict[str, list[str]],
                   assets: Path) -> PredictorModule:
    """The architecture of a saved predictor from its assets; its weights come from a checkpoint."""
    backbones: dict[str, Backbone] = {
        name: create_backbone(name, hyperparameters, cols, problem=problem, assets_dir=assets / name) for name, cols in columns.items()}
    return PredictorModule(backbones, problem, hyperparameters)


def save_assets(module: PredictorModule, assets: Path) -> None:
    for name, backbone in module.backbones.items():
        backbone.save_assets(assets / name)
