"""timm_image: any timm architecture over one or more image columns, pooled features averaged
over the images a row has.

Transforms take timm's data config (input size, mean and std) and AutoMM's transform names and
constants; the random ones draw from the per-sample RNG state the loader sets up, so
augmentation is part of the exactly resumed state whatever the number of workers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torchvision import transforms as T

from kontinue.api.contract import InvalidInput
from kontinue.trainer.augment import TrivialAugment
from kontinue.trainer.backbones import Backbone, Processor, register_backbone, resolve_checkpoint_name
from kontinue.trainer.images import is_missing, load_image

DUMP_CONFIG, DUMP_WEIGHTS = "config.json", "model.safetensors"
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class TimmImageOptions:
    checkpoint_name: str = "swin_base_patch4_window7_224"
    image_size: int | None = None  # None: the architecture's own input size
    train_transforms: tuple[str, ...] = ("resize_shorter_side", "center_crop", "trivial_augment")
    val_transforms: tuple[str, ...] = ("resize_shorter_side", "center_crop")


# AutoMM's transforms with its constants: resizes are bicubic whatever the architecture's own
# interpolation, a random resized crop keeps torchvision's bilinear default, colour jitter is 0.1.
BICUBIC = T.InterpolationMode.BICUBIC
TRANSFORMS = {
    "resize_shorter_side": lambda size: T.Resize(size, interpolation=BICUBIC),
    "resize_to_square": lambda size: T.Resize((size, size), interpolation=BICUBIC),
    "center_crop": lambda size: T.CenterCrop(size),
    "random_resize_crop": lambda size: T.RandomResizedCrop(size),
    "random_horizontal_flip": lambda size: T.RandomHorizontalFlip(),
    "random_vertical_flip": lambda size: T.RandomVerticalFlip(),
    "color_jitter": lambda size: T.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1),
    "affine": lambda size: T.RandomAffine(15, translate=(0.1, 0.1), scale=(0.9, 1.1)),
    "trivial_augment": lambda size: TrivialAugment(),
}


def _source(options: TimmImageOptions, name: str, assets_dir: Path | None) -> tuple[str, dict[str, Any], Path | None]:
    """(architecture, the folder's stored data config, dumped folder or None): a dump's (or a saved
    predictor's) config.json names its architecture and the input size and normalisation it was
    trained with, which AutoMM also takes from a dump."""
    folder = assets_dir or Path(resolve_checkpoint_name(options.checkpoint_name))
    if folder.is_dir():
        config_file = folder / DUMP_CONFIG
        if not config_file.is_file():
            raise InvalidInput(f"hyperparameters.model.{name}.checkpoint_name",
                               f"{folder} is not a timm_image dump ({DUMP_CONFIG} missing)")
        config = json.loads(config_file.read_text())
        stored = config.get("pretrained_cfg") or {}
        data = {key: stored[key] for key in DATA_CONFIG_KEYS if key in stored}
        return config["architecture"], data, (None if assets_dir else folder)
    return options.checkpoint_name, {}, None


class ImageProcessor(Processor):
    def __init__(self, prefix: str, columns: list[str], options: TimmImageOptions, data_config: dict[str, Any]):
        super().__init__(prefix, columns)
        self.options, self.data_config = options, data_config
        self.image_size = int(data_config["input_size"][-1])
        self._transforms: dict[bool, T.Compose] = {}

    def _transform(self, training: bool) -> T.Compose:
        if training not in self._transforms:
            names = self.options.train_transforms if training else self.options.val_transforms
            steps = [TRANSFORMS[name](self.image_size) for name in names]
            if not any(name in ("center_crop", "random_resize_crop", "resize_to_square") for name in names):
                steps.append(TRANSFORMS["resize_to_square"](self.image_size))
            steps += [T.ToTensor(), T.Normalize(self.data_config["mean"], self.data_config["std"])]
            self._transforms[training] = T.Compose(steps)
        return self._transforms[training]

    def prepare(self, data: pd.DataFrame) -> list[dict[str, Any]]:
        self.check_columns(data)
        return [{"images": list(values)} for values in data[self.columns].itertuples(index=False, name=None)]

    def transform(self, row: dict[str, Any], *, training: bool) -> dict[str, Any]:
        transform = self._transform(training)
        blank = torch.zeros(3, self.image_size, self.image_size)
        images = [blank if is_missing(value) else transform(load_image(value)) for value in row["images"]]
        return {"pixels": torch.stack(images),
                "valid": torch.tensor([not is_missing(value) for value in row["images"]])}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {self.key("pixels"): torch.stack([item["pixels"] for item in items]),
                self.key("valid"): torch.stack([item["valid"] for item in items])}


@register_backbone("timm_image")
class TimmImageBackbone(Backbone):
    modality = "image"
    Options = TimmImageOptions
    layer_rule = ("model", ("embed", "cls_token", "stem", "bn1", "conv1"), ("head", "norm", "bn2"))
    xavier_head = False

    def __init__(self, name: str, options: TimmImageOptions, columns: list[str], *,
                 data: pd.DataFrame | None = None, assets_dir: Path | None = None, **_: Any):
        super().__init__(name, options)
        import timm

        self.architecture, stored, dumped = _source(options, name, assets_dir)
        if not timm.is_model(self.architecture):
            raise InvalidInput(f"hyperparameters.model.{name}.checkpoint_name",
                               f"{self.architecture!r} is neither a timm architecture nor a timm_image dump")
        weights = {"file": str(dumped / DUMP_WEIGHTS)} if dumped else {}
        overlay = {**stored, **weights, "num_classes": 0} if stored or dumped else None
        # Offline: an architecture name starts from random weights; a dump brings its trained ones.
        self.model = timm.create_model(self.architecture, pretrained=dumped is not None, num_classes=0,
                                       pretrained_cfg_overlay=overlay)
        self.out_features = self.model.num_features
        config = timm.data.resolve_data_config({}, model=self.model)
        size = int(options.image_size or config["input_size"][-1])
        self.processor = ImageProcessor(name, columns, options, {**config, "input_size": (3, size, size)})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels, valid = batch[self.processor.key("pixels")], batch[self.processor.key("valid")]
        rows, per_row = pixels.shape[:2]
        features = self.model(pixels.flatten(0, 1)).view(rows, per_row, -1)
        weights = valid.unsqueeze(-1).to(features.dtype)
        return (features * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def _config(self) -> dict[str, Any]:
        input_size = list(self.processor.data_config["input_size"])
        return {"architecture": self.architecture, "num_classes": 0, "num_features": self.out_features,
                "global_pool": "avg", "pretrained_cfg": {**self.model.pretrained_cfg, "num_classes": 0,
                                                         "input_size": input_size}}

    def save_assets(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / DUMP_CONFIG).write_text(json.dumps(self._config(), indent=2, default=str))

    def dump(self, directory: Path) -> None:
        """config.json + model.safetensors, loadable with timm alone:
        timm.create_model(arch, pretrained=True, num_classes=0,
                          pretrained_cfg_overlay=dict(file=.../model.safetensors, num_classes=0))"""
        from safetensors.torch import save_file

        self.save_assets(directory)
        state = {key: value.detach().cpu().contiguous() for key, value in self.model.state_dict().items()}
        save_file(state, directory / DUMP_WEIGHTS)
