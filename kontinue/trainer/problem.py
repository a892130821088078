"""What is being predicted: one class per kind of problem owns its targets, loss, outputs and metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torchmetrics import functional as tmf

from kontinue.api.contract import InvalidInput
from kontinue.trainer.heads import create_head
from kontinue.api.families import (BINARY, METRIC_ALIASES, METRICS, MULTICLASS, OBJECT_DETECTION, PROBLEM_TYPES,
                                   REGRESSION)

CLASSIFICATION = (BINARY, MULTICLASS)
DEFAULT_METRIC = {BINARY: "roc_auc", MULTICLASS: "accuracy", REGRESSION: "rmse", OBJECT_DETECTION: "map"}
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "roc_auc": True, "log_loss": False, "rmse": False,
                    "mae": False, "r2": True, "pearsonr": True, "spearmanr": True, "map": True, "map_50": True}


def _kind(problem_type: str) -> type["Problem"]:
    return next(cls for cls in (ClassificationProblem, RegressionProblem, ObjectDetectionProblem)
                if problem_type in cls.kinds)


def canonical_metric(name: str) -> str:
    return METRIC_ALIASES.get(name.lower(), name.lower())


def infer_problem_type(labels: pd.Series) -> str:
    """AutoMM-like: floats with many distinct values are regression, two classes binary."""
    distinct = labels.dropna().nunique()
    if pd.api.types.is_float_dtype(labels) and distinct > 2 and not np.all(np.mod(labels.dropna(), 1) == 0):
        return REGRESSION
    if distinct == 2:
        return BINARY
    if pd.api.types.is_numeric_dtype(labels) and distinct > 20 and not pd.api.types.is_bool_dtype(labels):
        return REGRESSION
    return MULTICLASS


@dataclass
class Problem:
    """Everything about the label that predictions and resumes must agree on."""

    label: str
    problem_type: str
    eval_metric: str
    kinds: ClassVar[tuple[str, ...]] = ()

    @staticmethod
    def from_data(label: str, data: pd.DataFrame, problem_type: str | None, eval_metric: str | None) -> "Problem":
        if label not in data.columns:
            raise InvalidInput("label", f"column {label!r} is not in the data (columns: {list(data.columns)})")
        labels = data[label]
        if problem_type != OBJECT_DETECTION and labels.isna().any():
            raise InvalidInput("label", f"column {label!r} has {int(labels.isna().sum())} missing values")
        problem_type = problem_type or infer_problem_type(labels)
        if problem_type not in PROBLEM_TYPES:
            raise InvalidInput("problem_type", f"{problem_type!r} is not supported by this trainer; "
                               f"use one of {list(PROBLEM_TYPES)}")
        metric = canonical_metric(eval_metric or DEFAULT_METRIC[problem_type])
        if metric not in METRICS[problem_type]:
            raise InvalidInput("eval_metric", f"{metric!r} does not fit problem_type {problem_type!r}; "
                               f"use one of {list(METRICS[problem_type])}")
        return _kind(problem_type).learn(label, problem_type, metric, labels)

    @staticmethod
    def from_dict(values: dict[str, Any]) -> "Problem":
        kind = _kind(values["problem_type"])
        return kind(**{key: value for key, value in values.items() if key in kind.__dataclass_fields__})

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.eval_metric]

    # -- how a model for this problem is trained and read; a detector overrides these --------------
    def create_head(self, widths: list[int], hyperparameters: dict[str, Any], xavier: bool) -> torch.nn.Module:
        """A linear layer over one backbone, fusion_mlp over several."""
        return create_head(widths, self.num_outputs, hyperparameters["model.names"], hyperparameters, xavier)

    def outputs(self, module: torch.nn.Module, batch: dict[str, Any]) -> Any:
        return module(batch).float()

    def step_loss(self, module: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss(module(batch), batch["target"])

    def collate_targets(self, targets: list[Any]) -> Any:
        return torch.stack(targets)

    def merge(self, parts: list[Any]) -> Any:
        """One batch's outputs (or targets) after another, as one."""
        return torch.cat([part.cpu() for part in parts])

    def select(self, values: Any, rows: torch.Tensor) -> Any:
        return values[rows]

    def score(self, outputs: torch.Tensor, targets: torch.Tensor, metrics: list[str] | None = None) -> dict[str, float]:
        """Metrics on a whole evaluation set, in the label's own units."""
        names = [canonical_metric(name) for name in (metrics or METRICS[self.problem_type])]
        results = {}
        for name in names:
            if name not in METRICS[self.problem_type]:
                raise InvalidInput("metrics", f"{name!r} does not fit problem_type {self.problem_type!r}")
            results[name] = float(self._metric(name, outputs, targets))
        return results

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClassificationProblem(Problem):
    classes: list[Any] = field(default_factory=list)
    kinds: ClassVar[tuple[str, ...]] = CLASSIFICATION

    @classmethod
    def learn(cls, label: str, problem_type: str, metric: str, labels: pd.Series) -> "ClassificationProblem":
        classes = sorted(labels.unique().tolist(), key=lambda value: (str(type(value)), value))
        if problem_type == BINARY and len(classes) != 2:
            raise InvalidInput("problem_type", f"binary needs 2 classes, column {label!r} has {len(classes)}")
        return cls(label, problem_type, metric, classes)

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def encode(self, labels: pd.Series) -> torch.Tensor:
        lookup = {value: index for index, value in enumerate(self.classes)}
        unknown = set(labels.unique()) - set(lookup)
        if unknown:
            raise InvalidInput("label", f"values {sorted(map(str, unknown))[:5]} were not seen in training")
        return torch.tensor([lookup[value] for value in labels], dtype=torch.long)

    def decode(self, outputs: torch.Tensor) -> np.ndarray:
        # the label's own dtype (int64 for 0/1 labels), as AutoMM returns; object only for mixed types
        return pd.Series(self.classes).to_numpy()[outputs.argmax(dim=-1).numpy()]

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(outputs.float(), dim=-1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(outputs.float(), targets)

    def _metric(self, name: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        probabilities = self.probabilities(outputs.float())
        if name == "log_loss":
            return torch.nn.functional.nll_loss(probabilities.clamp_min(1e-15).log(), targets)
        if self.problem_type == BINARY:
            positive = probabilities[:, 1]
            return {
                "accuracy": lambda: tmf.accuracy(positive, targets, task="binary"),
                "f1": lambda: tmf.f1_score(positive, targets, task="binary"),
                "roc_auc": lambda: tmf.auroc(positive, targets, task="binary"),
            }[name]()
        classes = self.num_outputs
        return {
            "accuracy": lambda: tmf.accuracy(probabilities, targets, task="multiclass", num_classes=classes),
            "f1": lambda: tmf.f1_score(probabilities, targets, task="multiclass", num_classes=classes,
                                       average="macro"),
        }[name]()


@dataclass
class RegressionProblem(Problem):
    target_mean: float = 0.0
    target_std: float = 1.0
    kinds: ClassVar[tuple[str, ...]] = (REGRESSION,)

    @classmethod
    def learn(cls, label: str, problem_type: str, metric: str, labels: pd.Series) -> "RegressionProblem":
        values = labels.astype(float)
        return cls(label, problem_type, metric, float(values.mean()), float(values.std() or 1.0))

    num_outputs = 1
    classes: ClassVar[list[Any]] = []

    def encode(self, labels: pd.Series) -> torch.Tensor:
        values = labels.astype(float).to_numpy()
        return torch.tensor((values - self.target_mean) / self.target_std, dtype=torch.float32)

    def decode(self, outputs: torch.Tensor) -> np.ndarray:
        return outputs.squeeze(-1).double().numpy() * self.target_std + self.target_mean

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(outputs.float().squeeze(-1), targets)

    def _metric(self, name: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        predicted = outputs.float().squeeze(-1) * self.target_std + self.target_mean
        actual = targets.float() * self.target_std + self.target_mean
        return {
            "rmse": lambda: tmf.mean_squared_error(predicted, actual).sqrt(),
            "mae": lambda: tmf.mean_absolute_error(predicted, actual),
            "r2": lambda: tmf.r2_score(predicted, actual),
            "pearsonr": lambda: tmf.pearson_corrcoef(predicted, actual),
            "spearmanr": lambda: tmf.spearman_corrcoef(predicted, actual),
        }[name]()


@dataclass
class ObjectDetectionProblem(Problem):
    """Boxes with class labels per image (AutoMM's object_detection). A cell of the label column is a
    list of [x1, y1, x2, y2, class] (or {"bbox": [x1, y1, x2, y2], "class": class}) in pixels of the
    original image; the detector brings its own head and losses, the problem its targets and mAP."""

    classes: list[Any] = field(default_factory=list)
    kinds: ClassVar[tuple[str, ...]] = (OBJECT_DETECTION,)

    @classmethod
    def learn(cls, label: str, problem_type: str, metric: str, labels: pd.Series) -> "ObjectDetectionProblem":
        boxes = [box for cell in labels for box in parse_boxes(cell, label)]
        classes = sorted({box[4] for box in boxes}, key=lambda value: (str(type(value)), value))
        if not classes:
            raise InvalidInput("label", f"column {label!r} holds no boxes")
        return cls(label, problem_type, metric, classes)

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    def encode(self, labels: pd.Series) -> list[dict[str, torch.Tensor]]:
        lookup = {value: index for index, value in enumerate(self.classes)}
        encoded = []
        for cell in labels:
            boxes = parse_boxes(cell, self.label)
            unknown = {box[4] for box in boxes} - set(lookup)
            if unknown:
                raise InvalidInput("label", f"classes {sorted(map(str, unknown))[:5]} were not seen in training")
            encoded.append({"boxes": torch.tensor([box[:4] for box in boxes], dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor([lookup[box[4]] for box in boxes], dtype=torch.long)})
        return encoded

    def decode(self, outputs: list[dict[str, torch.Tensor]]) -> list[list[dict[str, Any]]]:
        """Per image, AutoMM's shape: [{"class": name, "bbox": [x1, y1, x2, y2], "score": s}, ...]."""
        return [[{"class": self.classes[int(label)], "bbox": [float(v) for v in box], "score": float(score)}
                 for box, score, label in zip(output["boxes"], output["scores"], output["labels"])]
                for output in outputs]

    def create_head(self, widths: list[int], hyperparameters: dict[str, Any], xavier: bool) -> torch.nn.Module:
        if len(widths) != 1:
            raise InvalidInput("hyperparameters.model.names", "object_detection takes exactly one detector")
        return torch.nn.Identity()  # the detector has its own

    @staticmethod
    def _detector(module: torch.nn.Module) -> Any:
        return next(iter(module.backbones.values()))

    def outputs(self, module: torch.nn.Module, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        return self._detector(module).predict(batch)

    def step_loss(self, module: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self._detector(module).loss(batch)

    def collate_targets(self, targets: list[Any]) -> list[Any]:
        return list(targets)

    def merge(self, parts: list[Any]) -> list[Any]:
        return [row for part in parts for row in part]

    def select(self, values: list[Any], rows: torch.Tensor) -> list[Any]:
        return [values[int(row)] for row in rows]

    def score(self, outputs: list[dict[str, torch.Tensor]], targets: list[dict[str, torch.Tensor]],
              metrics: list[str] | None = None) -> dict[str, float]:
        from torchmetrics.detection import MeanAveragePrecision

        names = [canonical_metric(name) for name in (metrics or METRICS[self.problem_type])]
        unknown = [name for name in names if name not in METRICS[self.problem_type]]
        if unknown:
            raise InvalidInput("metrics", f"{unknown[0]!r} does not fit problem_type {self.problem_type!r}")
        average_precision = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        average_precision.update([{key: value.float() if key != "labels" else value for key, value in o.items()}
                                  for o in outputs], targets)
        result = average_precision.compute()
        return {name: float(result[name]) for name in names}


def parse_boxes(cell: Any, label: str) -> list[list[Any]]:
    """[[x1, y1, x2, y2, class], ...] from a label cell (lists, arrays from parquet, or dicts)."""
    if cell is None or (isinstance(cell, float) and cell != cell):
        return []
    boxes = []
    for box in list(cell):
        if isinstance(box, dict):
            corners, name = box.get("bbox"), box.get("class", box.get("label"))
        else:
            values = list(box)
            corners, name = values[:4], values[4] if len(values) == 5 else None
        if corners is None or len(corners) != 4 or name is None:
            raise InvalidInput("label", f"column {label!r}: a box is [x1, y1, x2, y2, class] or "
                               f'{{"bbox": [x1, y1, x2, y2], "class": c}}, got {box!r}')
        x1, y1, x2, y2 = (float(v) for v in corners)
        if not (x2 > x1 and y2 > y1):
            raise InvalidInput("label", f"column {label!r}: box {box!r} has no area (x2 > x1 and y2 > y1)")
        boxes.append([x1, y1, x2, y2, name.item() if hasattr(name, "item") else name])
    return boxes
