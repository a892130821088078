"""The LightningModule: backbones, a head, the loss, the optimizer and its schedule."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from kontinue.trainer.backbones import Backbone
from kontinue.trainer.optimization import create_optimizer, parameter_groups, schedule
from kontinue.trainer.problem import Problem


class PredictorModule(pl.LightningModule):
    """Family-agnostic: backbones make features, the head (linear or fusion_mlp) the outputs, and the
    problem owns the targets, the loss and the metrics."""

    def __init__(self, backbones: dict[str, Backbone], problem: Problem, hyperparameters: dict[str, Any],
                 total_steps: int = 1):
        super().__init__()
        self.backbones = nn.ModuleDict(backbones)
        # AutoMM's heads start Xavier-uniform, except the one it puts on a timm model alone
        xavier = len(backbones) > 1 or all(b.xavier_head for b in backbones.values())
        self.head = problem.create_head([b.out_features for b in backbones.values()], hyperparameters, xavier)
        self.problem = problem
        self.hyperparameters = hyperparameters
        self.total_steps = total_steps
        self.validation_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.last_validation: dict[str, float] = {}
        self.train()  # transformers returns encoders in eval mode; dropout must be on while training

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.head([backbone(batch) for backbone in self.backbones.values()])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.problem.step_loss(self, batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["index"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_outputs.append((batch["index"], self.problem.outputs(self, batch), batch["target"]))

    def on_validation_epoch_end(self) -> None:
        """Scores the whole validation set at once, gathered from every process."""
        indices, outputs, targets = zip(*self.validation_outputs)
        self.validation_outputs.clear()
        indices, outputs, targets = torch.cat(indices), self.problem.merge(outputs), self.problem.merge(targets)
        if self.trainer.world_size > 1:
            indices, outputs, targets = (self._gather(part) for part in (indices, outputs, targets))
        order = torch.argsort(indices.cpu())
        indices = indices.cpu()[order]
        first = torch.ones_like(indices, dtype=torch.bool)
        first[1:] = indices[1:] != indices[:-1]  # a distributed sampler may repeat rows to pad
        kept = order[first]
        scores = self.problem.score(self.problem.select(outputs, kept), self.problem.select(targets, kept))
        self.last_validation = scores
        for name, value in scores.items():
            self.log(f"val_{name}", value, sync_dist=False, rank_zero_only=True)
        self.log("val_score", scores[self.problem.eval_metric], prog_bar=True, rank_zero_only=True)

    def _gather(self, part: Any) -> Any:
        """Every process's part, in rank order: tensors by all_gather, lists (boxes) as objects."""
        if isinstance(part, torch.Tensor):
            return self.all_gather(part).flatten(0, 1).cpu()
        parts: list[Any] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(parts, part)
        return [row for rank_part in parts for row in rank_part]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Any:
        return self.problem.outputs(self, batch)

    def layer_ids(self) -> dict[str, int]:
        """Layer ids of every parameter (the head's are 0), for layer-wise learning-rate decay."""
        return {f"backbones.{name}.{parameter}": layer
                for name, backbone in self.backbones.items() for parameter, layer in backbone.layer_ids().items()}

    def configure_optimizers(self):
        hp = self.hyperparameters
        optimizer = create_optimizer(parameter_groups(self, self.layer_ids(), hp), hp)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(hp, self.total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
