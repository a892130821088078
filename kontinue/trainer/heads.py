"""Heads over backbone features: one linear layer over a single backbone, AutoMM's fusion_mlp over
several. Fusion is a head, not a backbone; the problem says how many outputs it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kontinue.api.families import FUSION_HEADS


@dataclass(frozen=True)
class FusionOptions:
    hidden_sizes: tuple[int, ...] = (128,)
    drop_rate: float = 0.1
    adapt_in_features: str = "max"  # each backbone's features are first mapped to the max (or min) width


class LinearHead(nn.Linear):
    def __init__(self, widths: list[int], outputs: int):
        super().__init__(sum(widths), outputs)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return super().forward(torch.cat(features, dim=-1) if len(features) > 1 else features[0])


class FusionMLP(nn.Module):
    """Adapters to a common width, concatenated, then an MLP (AutoMM's fusion_mlp)."""

    def __init__(self, widths: list[int], outputs: int, options: FusionOptions):
        super().__init__()
        width = max(widths) if options.adapt_in_features == "max" else min(widths)
        self.adapters = nn.ModuleList(nn.Linear(w, width) for w in widths)
        layers: list[nn.Module] = []
        in_features = width * len(widths)
        for hidden in options.hidden_sizes:
            layers += [nn.Linear(in_features, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                       nn.Dropout(options.drop_rate)]
            in_features = hidden
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(in_features, outputs)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        adapted = torch.cat([adapter(f) for adapter, f in zip(self.adapters, features)], dim=-1)
        return self.out(self.mlp(adapted))


def init_weights(module: nn.Module) -> None:
    """AutoMM's initialisation of the layers it adds: Xavier-uniform weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def create_head(widths: list[int], outputs: int, names: list[str], hyperparameters: dict[str, Any],
                xavier: bool) -> nn.Module:
    """fusion_mlp when model.names asks for it and there is more than one backbone to fuse; with
    `xavier`, AutoMM's initialisation, else torch's default (AutoMM's head on a timm model)."""
    if len(widths) > 1 and any(name in FUSION_HEADS for name in names):
        options = FusionOptions(
            hidden_sizes=tuple(hyperparameters["model.fusion_mlp.hidden_sizes"]),
            drop_rate=hyperparameters["model.fusion_mlp.drop_rate"],
            adapt_in_features=hyperparameters["model.fusion_mlp.adapt_in_features"])
        head: nn.Module = FusionMLP(widths, outputs, options)
    else:
        head = LinearHead(widths, outputs)
    if xavier:
        head.apply(init_weights)
    return head
