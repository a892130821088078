"""MMDetection through the Predictor API as AutoMM users call it: a RetinaNet (ResNet-18) on generated
shapes whose boxes are known, from an AutoMM detection table or a COCO file; mAP, boxes per image, a
dump MMDetection loads by itself, and a new task from the dump. Needs the detection extra (mmcv with
its compiled ops), which `make test` installs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from examples.prepare_shapes import to_coco
from kontinue.trainer.predictor import Predictor

pytest.importorskip("mmdet", reason="the detection extra is not installed: run `make install`")
DETECTOR = {"model.mmdet_image.checkpoint_name": "retinanet_r18_fpn_1x_coco", "model.mmdet_image.image_size": 64,
            "optim.max_epochs": 4, "env.per_gpu_batch_size": 8, "env.batch_size": 8, "optim.lr": 1e-3,
            "optim.val_check_interval": 1.0}
PICKLE_SUFFIXES = {".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt"}


@pytest.fixture(scope="module")
def detector(tmp_path_factory, shapes) -> Predictor:
    """Trained from a COCO file, as AutoMM's detection examples do."""
    root = Path(shapes["image"][0]).parent
    to_coco(shapes[:120], root / "train.json")
    predictor = Predictor(problem_type="object_detection", path=tmp_path_factory.mktemp("detector") / "p",
                          enable_progress_bar=False)
    return predictor.fit(str(root / "train.json"), hyperparameters=DETECTOR, seed=0)


def test_fit_from_coco_evaluate_map_and_predict_boxes(detector, shapes):
    assert detector.label == "rois" and detector.class_labels == ["circle", "square"]
    assert detector.column_types == {"image": "image_path"}
    test = shapes[120:]
    scores = detector.evaluate(test)
    assert set(scores) == {"map", "map_50"} and 0.0 <= scores["map"] <= scores["map_50"] <= 1.0
    assert scores["map_50"] > 0.05, f"the detector learned nothing about the shapes: {scores}"
    predictions = detector.predict(test[:4])
    assert predictions.index.equals(test[:4].index) and len(predictions) == 4
    for boxes in predictions:
        assert all(box["class"] in ("circle", "square") and 0.0 <= box["score"] <= 1.0 for box in boxes)
        assert all(0.0 <= v <= 64.0 for box in boxes for v in box["bbox"]), "boxes are in the image's pixels"
    with pytest.raises(ValueError, match="predict_proba"):
        detector.predict_proba(test[:2])
    assert Predictor.load(detector.path).evaluate(test) == pytest.approx(scores)


def test_the_dump_loads_with_mmdetection_alone(detector, shapes, tmp_path):
    from mmdet.apis import inference_detector, init_detector
    from safetensors.torch import load_file

    dump = Path(detector.dump_model(tmp_path / "dump"))
    files = {str(p.relative_to(dump)) for p in dump.rglob("*") if p.is_file()}
    assert files == {"mmdet_image/config.json", "mmdet_image/model.safetensors"}
    model = init_detector(str(dump / "mmdet_image" / "config.json"), device="cpu")
    model.load_state_dict(load_file(dump / "mmdet_image" / "model.safetensors"))
    trained = torch.load(Path(detector.path) / "model.ckpt", weights_only=True)["state_dict"]
    prefix = "backbones.mmdet_image.detector."
    assert all(torch.equal(value, trained[prefix + key]) for key, value in model.state_dict().items())
    result = inference_detector(model, shapes["image"][130])  # MMDetection's own pipeline from the config
    ours = detector.predict(shapes[130:131]).iloc[0]
    assert len(result.pred_instances.bboxes) == len(ours)
    assert np.allclose(result.pred_instances.scores.numpy(), [box["score"] for box in ours], atol=1e-3)


def test_a_new_task_from_the_dump_keeps_the_detector_and_gets_a_fresh_head(detector, shapes, tmp_path):
    """Use case 3: only squares are wanted now (one class): the head is new, the rest the dump's."""
    dump = Path(detector.dump_model(tmp_path / "dump"))
    squares = shapes.assign(rois=[[box for box in rois if box[4] == "square"] for rois in shapes["rois"]])
    squares = squares[squares["rois"].map(len) > 0]
    new = Predictor(problem_type="object_detection", path=tmp_path / "squares", enable_progress_bar=False)
    new.fit(squares[:60], seed=0, hyperparameters={
        **DETECTOR, "optim.max_epochs": 1, "optim.lr": 0.0, "model.mmdet_image.checkpoint_name": str(dump / "mmdet_image")})
    assert new.class_labels == ["square"]
    from safetensors.torch import load_file

    dumped = load_file(dump / "mmdet_image" / "model.safetensors")
    started = torch.load(Path(new.path) / "model.ckpt", weights_only=True)["state_dict"]
    prefix = "backbones.mmdet_image.detector."
    head = [key for key in dumped if key.startswith("bbox_head.retina_cls")]
    kept = [key for key in dumped if key not in head and "running" not in key and "num_batches" not in key]
    assert started[prefix + "bbox_head.retina_cls.weight"].shape[0] != dumped["bbox_head.retina_cls.weight"].shape[0]
    assert all(torch.equal(started[prefix + key], dumped[key]) for key in kept), "lr 0: the dump's weights"
    assert set(new.evaluate(squares[60:80])) == {"map", "map_50"}
