"""What is being predicted: problem type inference, label encoding and metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchmetrics import functional as tmf

BINARY, MULTICLASS, REGRESSION = "binary", "multiclass", "regression"
CLASSIFICATION = (BINARY, MULTICLASS)
DEFAULT_METRIC = {BINARY: "roc_auc", MULTICLASS: "accuracy", REGRESSION: "rmse"}
METRIC_ALIASES = {"acc": "accuracy"}
HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "roc_auc": True, "log_loss": False, "rmse": False,
                    "mae": False, "r2": True, "pearsonr": True, "spearmanr": True}
METRICS_FOR = {
    BINARY: ("accuracy", "f1", "roc_auc", "log_loss"),
    MULTICLASS: ("accuracy", "f1", "log_loss"),
    REGRESSION: ("rmse", "mae", "r2", "pearsonr", "spearmanr"),
}


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
    classes: list[Any] = field(default_factory=list)
    target_mean: float = 0.0
    target_std: float = 1.0

    @classmethod
    def from_data(cls, label: str, data: pd.DataFrame, problem_type: str | None,
                  eval_metric: str | None) -> "Problem":
        if label not in data.columns:
            raise ValueError(f"label: column {label!r} is not in the data (columns: {list(data.columns)})")
        labels = data[label]
        if labels.isna().any():
            raise ValueError(f"label: column {label!r} has {int(labels.isna().sum())} missing values")
        problem_type = problem_type or infer_problem_type(labels)
        if problem_type not in METRICS_FOR:
            raise ValueError(f"problem_type: {problem_type!r} is not supported by the text trainer; "
                             f"use one of {sorted(METRICS_FOR)}")
        metric = canonical_metric(eval_metric or DEFAULT_METRIC[problem_type])
        if metric not in METRICS_FOR[problem_type]:
            raise ValueError(f"eval_metric: {metric!r} does not fit problem_type {problem_type!r}; "
                             f"use one of {list(METRICS_FOR[problem_type])}")
        problem = cls(label, problem_type, metric)
        if problem_type in CLASSIFICATION:
            problem.classes = sorted(labels.unique().tolist(), key=lambda value: (str(type(value)), value))
            if problem_type == BINARY and len(problem.classes) != 2:
                raise ValueError(f"problem_type: binary needs 2 classes, column {label!r} has "
                                 f"{len(problem.classes)}")
        else:
            values = labels.astype(float)
            problem.target_mean, problem.target_std = float(values.mean()), float(values.std() or 1.0)
        return problem

    @property
    def num_outputs(self) -> int:
        return len(self.classes) if self.problem_type in CLASSIFICATION else 1

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.eval_metric]

    def encode(self, labels: pd.Series) -> torch.Tensor:
        if self.problem_type in CLASSIFICATION:
            lookup = {value: index for index, value in enumerate(self.classes)}
            unknown = set(labels.unique()) - set(lookup)
            if unknown:
                raise ValueError(f"label: values {sorted(map(str, unknown))[:5]} were not seen in training")
            return torch.tensor([lookup[value] for value in labels], dtype=torch.long)
        values = labels.astype(float).to_numpy()
        return torch.tensor((values - self.target_mean) / self.target_std, dtype=torch.float32)

    def decode(self, outputs: torch.Tensor) -> np.ndarray:
        """Model outputs to label values (class names, or de-standardised numbers)."""
        if self.problem_type in CLASSIFICATION:
            # the label's own dtype (int64 for 0/1 labels), as AutoMM returns; object only for mixed types
            return pd.Series(self.classes).to_numpy()[outputs.argmax(dim=-1).numpy()]
        return outputs.squeeze(-1).double().numpy() * self.target_std + self.target_mean

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(outputs.float(), dim=-1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.problem_type in CLASSIFICATION:
            return torch.nn.functional.cross_entropy(outputs.float(), targets)
        return torch.nn.functional.mse_loss(outputs.float().squeeze(-1), targets)

    def score(self, outputs: torch.Tensor, targets: torch.Tensor, metrics: list[str] | None = None) -> dict[str, float]:
        """Metrics on a whole evaluation set, in the label's own units."""
        names = [canonical_metric(name) for name in (metrics or METRICS_FOR[self.problem_type])]
        outputs, targets = outputs.float(), targets
        results = {}
        for name in names:
            if name not in METRICS_FOR[self.problem_type]:
                raise ValueError(f"metrics: {name!r} does not fit problem_type {self.problem_type!r}")
            results[name] = float(self._metric(name, outputs, targets))
        return results

    def _metric(self, name: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.problem_type == REGRESSION:
            predicted = outputs.squeeze(-1) * self.target_std + self.target_mean
            actual = targets.float() * self.target_std + self.target_mean
            return {
                "rmse": lambda: tmf.mean_squared_error(predicted, actual).sqrt(),
                "mae": lambda: tmf.mean_absolute_error(predicted, actual),
                "r2": lambda: tmf.r2_score(predicted, actual),
                "pearsonr": lambda: tmf.pearson_corrcoef(predicted, actual),
                "spearmanr": lambda: tmf.spearman_corrcoef(predicted, actual),
            }[name]()
        probabilities = self.probabilities(outputs)
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
