"""mmdet_image: an MMDetection detector over one image column, for object_detection.

Its config comes from MMDetection's own configs by name, from a .json/.yaml file, or from a dump;
weights only ever from safetensors (MMDetection's own checkpoints need unpickling). The detector
brings its head and losses: the problem (ObjectDetectionProblem) gives its classes and targets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from kontinue.api.contract import InvalidInput
from kontinue.trainer.backbones import Backbone, Processor, register_backbone, resolve_checkpoint_name
from kontinue.trainer.images import is_missing, load_image
from kontinue.trainer.problem import parse_boxes

DUMP_CONFIG, DUMP_WEIGHTS = "config.json", "model.safetensors"
log = logging.getLogger("kontinue.trainer")


@dataclass(frozen=True)
class MMDetImageOptions:
    checkpoint_name: str = "yolov3_mobilenetv2_8xb24-320-300e_coco"
    image_size: int | None = None


def _packaged_config(name: str) -> Path | None:
    import mmdet

    configs = Path(mmdet.__file__).parent / ".mim" / "configs"
    return next(configs.glob(f"*/{name}.py"), None)


def _without_pretrained(node: Any) -> Any:
    """The config with every init_cfg of type Pretrained removed: nothing is downloaded."""
    if isinstance(node, dict):
        return {key: _without_pretrained(value) for key, value in node.items()
                if not (key == "init_cfg" and isinstance(value, dict) and value.get("type") == "Pretrained")}
    if isinstance(node, (list, tuple)):
        return type(node)(_without_pretrained(value) for value in node)
    return node


def load_config(name: str, option: str, assets_dir: Path | None = None) -> tuple[Any, Path | None]:
    """(mmengine Config, the dumped weights to start from or None)."""
    from mmengine.config import Config

    folder = assets_dir or Path(resolve_checkpoint_name(name))
    if folder.is_dir():
        if not (folder / DUMP_CONFIG).is_file():
            raise InvalidInput(option, f"{folder} is not an mmdet_image dump ({DUMP_CONFIG} missing)")
        weights = folder / DUMP_WEIGHTS
        return Config.fromfile(str(folder / DUMP_CONFIG)), weights if weights.is_file() and not assets_dir else None
    if Path(name).suffix in (".json", ".yaml", ".yml") and Path(name).is_file():  # data, never code
        return Config.fromfile(name), None
    packaged = _packaged_config(name)
    if packaged is None:
        raise InvalidInput(option, f"{name!r} is neither an MMDetection config name, a .json/.yaml config file "
                           "nor an mmdet_image dump")
    return Config.fromfile(str(packaged)), None


def _bgr_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 CHW in BGR order, as MMDetection's pipelines (OpenCV) hand images to the detector."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image)[:, :, ::-1].transpose(2, 0, 1)))


class DetectionProcessor(Processor):
    """Reads an image, resizes it to fit the scale (keeping its aspect ratio), flips it half the time
    when training, and moves its boxes along."""

    def __init__(self, prefix: str, columns: list[str], label: str, classes: list[Any], scale: tuple[int, int]):
        super().__init__(prefix, columns)
        self.label, self.classes, self.scale = label, list(classes), scale
        self._codes = {value: index for index, value in enumerate(self.classes)}

    def prepare(self, data: pd.DataFrame) -> list[dict[str, Any]]:
        self.check_columns(data)
        images = data[self.columns[0]].tolist()
        if self.label not in data.columns:  # prediction: no boxes
            return [{"image": image, "boxes": []} for image in images]
        return [{"image": image, "boxes": parse_boxes(cell, self.label)} for image, cell in zip(images, data[self.label])]

    def transform(self, row: dict[str, Any], *, training: bool) -> dict[str, Any]:
        if is_missing(row["image"]):
            raise ValueError(f"{self.columns[0]}: a row has no image")
        image = load_image(row["image"])
        width, height = image.size
        factor = min(self.scale[0] / width, self.scale[1] / height)
        new_width, new_height = max(1, round(width * factor)), max(1, round(height * factor))
        image = image.resize((new_width, new_height), Image.BILINEAR)
        sx, sy = new_width / width, new_height / height
        boxes = torch.tensor([box[:4] for box in row["boxes"]], dtype=torch.float32).reshape(-1, 4)
        boxes = boxes * torch.tensor([sx, sy, sx, sy])
        flip = training and bool(torch.rand(()) < 0.5)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = torch.stack([new_width - boxes[:, 2], boxes[:, 1], new_width - boxes[:, 0], boxes[:, 3]], dim=1)
        labels = torch.tensor([self._codes.get(box[4], -1) for box in row["boxes"]], dtype=torch.long)
        meta = {"img_shape": (new_height, new_width), "ori_shape": (height, width), "scale_factor": (sx, sy),
                "flip": flip, "flip_direction": "horizontal" if flip else None}
        return {"inputs": _bgr_tensor(image), "meta": meta, "boxes": boxes, "labels": labels}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        from mmdet.structures import DetDataSample
        from mmengine.structures import InstanceData

        samples = []
        for item in items:
            sample = DetDataSample(metainfo=item["meta"])
            sample.gt_instances = InstanceData(bboxes=item["boxes"], labels=item["labels"])
            samples.append(sample)
        return {self.key("inputs"): [item["inputs"] for item in items], self.key("samples"): samples}


@register_backbone("mmdet_image")
class MMDetImageBackbone(Backbone):
    modality = "image"
    Options = MMDetImageOptions
    #: AutoMM's class and box predictors of known detectors; other detectors' whole bbox_head
    PREDICTORS = ("bbox_head.fc_cls", "bbox_head.fc_reg", "bbox_head.convs_pred", "bbox_head.cls_branches",
                  "bbox_head.multi_level_conv_cls", "bbox_head.multi_level_conv_reg", "bbox_head.multi_level_conv_obj",
                  "bbox_head.vfnet_cls", "bbox_head.heatmap_head", "bbox_head.atss_cls", "bbox_head.cls_convs")

    def layer_ids(self) -> dict[str, int]:
        """AutoMM's two levels for a detector: its predictors at 0, the rest (pretrained) at 1."""
        names = [name for name, _ in self.named_parameters()]
        patterns = self.PREDICTORS if any(p in n for n in names for p in self.PREDICTORS) else ("bbox_head",)
        return {name: 0 if any(p in name for p in patterns) else 1 for name in names}

    def __init__(self, name: str, options: MMDetImageOptions, columns: list[str], *,
                 data: pd.DataFrame | None = None, assets_dir: Path | None = None, problem: Any = None, **_: Any):
        super().__init__(name, options)
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        from mmengine.config import ConfigDict
        from mmengine.logging import MMLogger

        register_all_modules()
        MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every tensor
        option = f"hyperparameters.model.{name}.checkpoint_name"
        if len(columns) != 1:
            raise InvalidInput("data", f"{name} detects objects in one image column; the data has {columns}")
        config, weights = load_config(options.checkpoint_name, option, assets_dir)
        config = _without_pretrained(config.to_dict())
        if weights is None and assets_dir is None:  # random weights: nothing is pretrained, so all of it trains
            backbone = config["model"].get("backbone", {})
            backbone.update({key: value for key, value in (("frozen_stages", -1), ("norm_eval", False))
                             if key in backbone})
        _set_num_classes(config["model"], len(problem.classes))
        config.setdefault("test_dataloader", {}).setdefault("dataset", {})["metainfo"] = {"classes": list(problem.classes)}
        self.config = config
        self.detector = MODELS.build(ConfigDict(config["model"]))  # its heads read test_cfg by attribute
        self.detector.init_weights()  # also what a new task's fresh head starts from (RetinaNet's prior)
        if weights is not None:
            self._load_dumped(weights)
        size = options.image_size or max(_test_scale(config))
        _set_resize_scale(config, size)  # the dumped config's test pipeline resizes as we do
        self.processor = DetectionProcessor(name, columns, problem.label, problem.classes, (size, size))
        self.out_features = len(problem.classes)

    def _load_dumped(self, weights: Path) -> None:
        """The dump's weights wherever their shapes fit; the class head of a new task starts fresh."""
        from safetensors.torch import load_file

        own = self.detector.state_dict()
        dumped = load_file(weights)
        fitting = {key: value for key, value in dumped.items() if key in own and own[key].shape == value.shape}
        fresh = sorted(set(own) - set(fitting))
        if fresh:
            log.info("%s: %d tensors start fresh (a new task's head): %s", self.prefix, len(fresh), fresh[:4])
        self.detector.load_state_dict(fitting, strict=False)

    def _preprocessed(self, batch: dict[str, Any], training: bool) -> dict[str, Any]:
        key = self.processor.key
        return self.detector.data_preprocessor({"inputs": batch[key("inputs")], "data_samples": batch[key("samples")]},
                                               training)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        data = self._preprocessed(batch, True)
        loss, _ = self.detector.parse_losses(self.detector.loss(data["inputs"], data["data_samples"]))
        return loss

    def predict(self, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        data = self._preprocessed(batch, False)
        results = self.detector.predict(data["inputs"], data["data_samples"], rescale=True)
        return [{"boxes": r.pred_instances.bboxes.detach().float().cpu(),
                 "scores": r.pred_instances.scores.detach().float().cpu(),
                 "labels": r.pred_instances.labels.detach().cpu()} for r in results]

    def forward(self, batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        return self.predict(batch)

    def save_assets(self, directory: Path) -> None:
        from mmengine.config import Config

        directory.mkdir(parents=True, exist_ok=True)
        Config(self.config).dump(str(directory / DUMP_CONFIG))

    def dump(self, directory: Path) -> None:
        """config.json + model.safetensors, loadable with MMDetection alone:
        model = init_detector(".../config.json"); model.load_state_dict(load_file(".../model.safetensors"))"""
        from safetensors.torch import save_file

        self.save_assets(directory)
        state = {key: value.detach().cpu().contiguous() for key, value in self.detector.state_dict().items()}
        save_file(state, directory / DUMP_WEIGHTS)


def _set_num_classes(node: Any, classes: int) -> None:
    """Every num_classes in the model config (a detector's heads) becomes the task's."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "num_classes":
                node[key] = classes
            else:
                _set_num_classes(value, classes)
    elif isinstance(node, list):
        for value in node:
            _set_num_classes(value, classes)


def _set_resize_scale(node: Any, size: int) -> None:
    """Every Resize step of the config's pipelines fits images into a size x size square (an int
    scale: JSON keeps no tuples, and MMDetection takes an int as a square)."""
    if isinstance(node, dict):
        if node.get("type") == "Resize" and "scale" in node:
            node["scale"], node["keep_ratio"] = size, True
        for value in node.values():
            _set_resize_scale(value, size)
    elif isinstance(node, list):
        for value in node:
            _set_resize_scale(value, size)


def _test_scale(config: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of the config's test-time Resize, else 640 x 640."""
    pipeline = (config.get("test_dataloader") or {}).get("dataset", {}).get("pipeline") or config.get("test_pipeline") or []
    for step in pipeline:
        if step.get("type") == "Resize" and step.get("scale"):
            scale = step["scale"]
            return (int(scale), int(scale)) if isinstance(scale, (int, float)) else tuple(int(v) for v in scale)
    return (640, 640)
