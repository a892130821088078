"""hf_text: a transformers encoder over the text columns, pooled to one vector."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from kontinue.api.contract import InvalidInput
from kontinue.trainer.backbones import Backbone, Processor, register_backbone, resolve_checkpoint_name


@dataclass(frozen=True)
class HFTextOptions:
    checkpoint_name: str = "google/electra-base-discriminator"
    max_text_len: int = 512
    pooling_mode: str = "cls"


class TextProcessor(Processor):
    def __init__(self, prefix: str, columns: list[str], tokenizer: Any, max_len: int):
        super().__init__(prefix, columns)
        self.tokenizer, self.max_len = tokenizer, max_len

    def prepare(self, data: pd.DataFrame) -> list[dict[str, Any]]:
        self.check_columns(data)
        texts = data[self.columns].fillna("").astype(str)
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
        return {self.key("input_ids"): ids, self.key("attention_mask"): mask}


@register_backbone("hf_text")
class HFTextBackbone(Backbone):
    modality = "text"
    Options = HFTextOptions
    layer_rule = ("encoder", ("embeddings", "LayerNorm", "wte", "wpe", "shared.weight", "encoder.conv.conv",
                              "relative_attention_bias"), ("head", "pooler", "ln_f", "final_layer_norm"))

    def __init__(self, name: str, options: HFTextOptions, columns: list[str], *,
                 data: pd.DataFrame | None = None, assets_dir: Path | None = None, **_: Any):
        super().__init__(name, options)
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        source = str(assets_dir) if assets_dir else resolve_checkpoint_name(options.checkpoint_name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            if assets_dir:
                self.encoder = AutoModel.from_config(AutoConfig.from_pretrained(source))
            else:
                self.encoder = AutoModel.from_pretrained(source)
        except OSError as error:
            raise InvalidInput(
                f"hyperparameters.model.{name}.checkpoint_name", f"cannot load {source!r} ({error}). Use a local "
                "transformers directory; kontinue never downloads from a model hub at run time.") from error
        self.processor = TextProcessor(name, columns, tokenizer, options.max_text_len)
        self.out_features = self.encoder.config.hidden_size

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        key = self.processor.key
        mask = batch[key("attention_mask")]
        states = self.encoder(input_ids=batch[key("input_ids")], attention_mask=mask).last_hidden_state
        if self.options.pooling_mode == "cls":
            return states[:, 0]
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def save_assets(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.processor.tokenizer.save_pretrained(directory)
        self.encoder.config.save_pretrained(directory)

    def dump(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(directory, safe_serialization=True)
        self.processor.tokenizer.save_pretrained(directory)
