"""numerical_mlp and categorical_mlp: AutoMM's towers for tabular columns. Their statistics and
vocabularies are learned from the training table and saved as assets; they are not dumped."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from kontinue.api.contract import InvalidInput
from kontinue.trainer.backbones import Backbone, Processor, register_backbone

ASSETS = "tabular.json"


@dataclass(frozen=True)
class TowerOptions:
    hidden_size: int = 128
    num_layers: int = 1
    drop_rate: float = 0.1


def _mlp(in_features: int, options: TowerOptions) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(options.num_layers):
        layers += [nn.Linear(in_features, options.hidden_size), nn.LayerNorm(options.hidden_size),
                   nn.LeakyReLU(), nn.Dropout(options.drop_rate)]
        in_features = options.hidden_size
    return nn.Sequential(*layers)


def _assets(data: pd.DataFrame | None, assets_dir: Path | None, learn) -> dict[str, Any]:
    if assets_dir is not None:
        return json.loads((assets_dir / ASSETS).read_text())
    if data is None:
        raise ValueError("a new tabular tower needs the training table")
    return learn(data)


class NumericalProcessor(Processor):
    """Standardised values (training mean and std); a missing value is 0 with a missing flag."""

    def __init__(self, prefix: str, columns: list[str], stats: dict[str, list[float]]):
        super().__init__(prefix, columns)
        self.stats = stats

    def prepare(self, data: pd.DataFrame) -> list[dict[str, Any]]:
        self.check_columns(data)
        try:
            values = torch.tensor(data[self.columns].astype(float).to_numpy(), dtype=torch.float32)
        except (TypeError, ValueError) as error:
            raise InvalidInput("data", f"numerical columns {self.columns} hold non-numbers ({error})") from error
        missing = values.isnan()
        mean, std = torch.tensor(self.stats["mean"]), torch.tensor(self.stats["std"])
        standard = torch.where(missing, torch.zeros_like(values), (values - mean) / std)
        return [{"values": torch.cat([row, flags.float()])} for row, flags in zip(standard, missing)]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {self.key("values"): torch.stack([item["values"] for item in items])}


class CategoricalProcessor(Processor):
    """Category codes per column from the training table's vocabulary; 0 is missing or unseen."""

    def __init__(self, prefix: str, columns: list[str], vocabularies: dict[str, list[str]]):
        super().__init__(prefix, columns)
        self.vocabularies = vocabularies
        self._codes = {name: {value: code for code, value in enumerate(words, start=1)}
                       for name, words in vocabularies.items()}

    def prepare(self, data: pd.DataFrame) -> list[dict[str, Any]]:
        self.check_columns(data)
        codes = [[self._codes[name].get(str(value), 0) if pd.notna(value) else 0 for value in data[name]]
                 for name in self.columns]
        return [{"codes": torch.tensor(row, dtype=torch.long)} for row in zip(*codes)]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {self.key("codes"): torch.stack([item["codes"] for item in items])}


class _Tower(Backbone):
    Options = TowerOptions

    def save_assets(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ASSETS).write_text(json.dumps(self._assets(), indent=2))


@register_backbone("numerical_mlp")
class NumericalMLP(_Tower):
    modality = "numerical"

    def __init__(self, name: str, options: TowerOptions, columns: list[str], *,
                 data: pd.DataFrame | None = None, assets_dir: Path | None = None, **_: Any):
        super().__init__(name, options)

        def learn(frame: pd.DataFrame) -> dict[str, Any]:
            values = frame[columns].astype(float)
            std = values.std().fillna(1.0).replace(0.0, 1.0)
            return {"mean": values.mean().fillna(0.0).tolist(), "std": std.tolist()}

        self.processor = NumericalProcessor(name, columns, _assets(data, assets_dir, learn))
        self.mlp = _mlp(2 * len(columns), options)
        self.out_features = options.hidden_size

    def _assets(self) -> dict[str, Any]:
        return self.processor.stats

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mlp(batch[self.processor.key("values")])


@register_backbone("categorical_mlp")
class CategoricalMLP(_Tower):
    modality = "categorical"

    def __init__(self, name: str, options: TowerOptions, columns: list[str], *,
                 data: pd.DataFrame | None = None, assets_dir: Path | None = None, **_: Any):
        super().__init__(name, options)

        def learn(frame: pd.DataFrame) -> dict[str, Any]:
            return {column: sorted(frame[column].dropna().astype(str).unique().tolist()) for column in columns}

        self.processor = CategoricalProcessor(name, columns, _assets(data, assets_dir, learn))
        sizes = [len(self.processor.vocabularies[column]) + 1 for column in columns]
        # AutoMM-like embedding width: grows slowly with the number of categories
        widths = [min(32, max(4, round(1.6 * math.sqrt(size)))) for size in sizes]
        self.embeddings = nn.ModuleList(nn.Embedding(size, width) for size, width in zip(sizes, widths))
        self.mlp = _mlp(sum(widths), options)
        self.out_features = options.hidden_size

    def _assets(self) -> dict[str, Any]:
        return self.processor.vocabularies

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        codes = batch[self.processor.key("codes")]
        return self.mlp(torch.cat([embed(codes[:, i]) for i, embed in enumerate(self.embeddings)], dim=-1))
