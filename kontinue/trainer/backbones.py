"""Backbones by AutoMM prefix: one name, one builder (the timm `create_model` idea)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

BACKBONES: dict[str, Callable[..., "Backbone"]] = {}


def register_backbone(prefix: str):
    def wrap(builder):
        BACKBONES[prefix] = builder
        return builder
    return wrap


def create_backbone(prefix: str, hyperparameters: dict[str, Any], assets_dir: Path | None = None,
                    *, pretrained: bool = True) -> "Backbone":
    """Builds the backbone `prefix`; with `assets_dir` and pretrained=False only its architecture."""
    if prefix not in BACKBONES:
        raise ValueError(f"hyperparameters.model.names: backbone {prefix!r} is not available in this "
                         f"trainer; available: {sorted(BACKBONES)}")
    return BACKBONES[prefix](hyperparameters, assets_dir=assets_dir, pretrained=pretrained)


class Backbone(nn.Module):
    """Turns one batch of encoded rows into one feature vector per row."""

    prefix: str
    out_features: int

    def columns(self, data: pd.DataFrame, label: str) -> list[str]:
        raise NotImplementedError

    def encode(self, data: pd.DataFrame) -> list[dict[str, Any]]:
        raise NotImplementedError

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def save_assets(self, directory: Path) -> None:
        """Writes what rebuilding this backbone needs without its original checkpoint."""
        raise NotImplementedError

    def dump(self, directory: Path) -> None:
        """Writes the trained backbone in its library's own format (AutoMM's dump_model)."""
        raise NotImplementedError


def resolve_checkpoint_name(name: str) -> str:
    """A `file://` URI or a path becomes a local directory; anything else stays a hub name."""
    if name.startswith("file://"):
        name = name[len("file://"):]
    expanded = os.path.expanduser(name)
    return expanded if os.path.isdir(expanded) else name


@register_backbone("hf_text")
class HFTextBackbone(Backbone):
    """A transformers encoder over the text columns, pooled to one vector."""

    prefix = "hf_text"

    def __init__(self, hyperparameters: dict[str, Any], assets_dir: Path | None = None, pretrained: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source = str(assets_dir) if assets_dir else resolve_checkpoint_name(
            hyperparameters["model.hf_text.checkpoint_name"])
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            if pretrained:
                self.encoder = AutoModel.from_pretrained(source)
            else:
                self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(source))
        except OSError as error:
            raise ValueError(
                f"hyperparameters.model.hf_text.checkpoint_name: cannot load {source!r} ({error}). Use a local "
                "transformers directory; kontinue never downloads from a model hub at run time.") from error
        self.max_len = int(hyperparameters["model.hf_text.max_text_len"])
        self.pooling = hyperparameters["model.hf_text.pooling_mode"]
        self.out_features = self.encoder.config.hidden_size
        self.text_columns: list[str] = []  # chosen by `columns`, restored by the predictor

    def columns(self, data: pd.DataFrame, label: str) -> list[str]:
        columns = [name for name in data.columns if name != label and
                   (pd.api.types.is_string_dtype(data[name]) or data[name].dtype == object)]
        if not columns:
            raise ValueError(f"data: hf_text needs at least one text column; columns are {list(data.columns)}")
        return columns

    def encode(self, data: pd.DataFrame) -> list[dict[str, Any]]:
        missing = [name for name in self.text_columns if name not in data.columns]
        if missing:
            raise ValueError(f"data: text column(s) {missing} are missing")
        texts = data[self.text_columns].fillna("").astype(str)
        joined = texts.agg(f" {self.tokenizer.sep_token or ''} ".join, axis=1).tolist()
        encoded = self.tokenizer(joined, truncation=True, max_length=self.max_len)
        return [{"input_ids": ids} for ids in encoded["input_ids"]]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, :len(item["input_ids"])] = torch.tensor(item["input_ids"])
            mask[row, :len(item["input_ids"])] = 1
        return {"hf_text_input_ids": ids, "hf_text_attention_mask": mask}

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["hf_text_attention_mask"]
        states = self.encoder(input_ids=batch["hf_text_input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0]
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def save_assets(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        self.encoder.config.save_pretrained(directory)

    def dump(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
