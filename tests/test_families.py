"""Every model family through the Predictor API as AutoMM users call it (only the import changed):
timm images and a text + image + tabular fusion model: fit, evaluate, predict, dump, each dump loaded
with its family's own library, and a new task trained from the dump. Real training, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kontinue.api.contract import InvalidInput
from kontinue.storage import open_store
from kontinue.trainer.backbones import resolve_checkpoint_name
from kontinue.trainer.backbones.timm_image import TimmImageBackbone, TimmImageOptions
from kontinue.trainer.columns import column_roles
from kontinue.trainer.predictor import Predictor

PICKLE_SUFFIXES = {".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt"}
TIMM = {"model.timm_image.checkpoint_name": "test_resnet", "model.timm_image.image_size": 32}
SMALL = {"optim.max_epochs": 2, "env.per_gpu_batch_size": 16, "env.batch_size": 16, "optim.lr": 3e-3,
         "optim.val_check_interval": 1.0}


def best_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(path) / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def dumped_files(dump: Path) -> set[str]:
    files = {str(p.relative_to(dump)) for p in dump.rglob("*") if p.is_file()}
    assert not [name for name in files if Path(name).suffix in PICKLE_SUFFIXES], f"pickles in the dump: {files}"
    return files


def load_timm_dump(folder: Path) -> torch.nn.Module:
    """As a timm user loads it: the architecture from config.json, the weights from the file."""
    import timm

    config = json.loads((folder / "config.json").read_text())
    return timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                             pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=0))


@pytest.fixture(scope="module")
def images(digits) -> pd.DataFrame:
    return digits[["image", "label"]]


@pytest.fixture(scope="module")
def timm_predictor(tmp_path_factory, images) -> Predictor:
    predictor = Predictor(label="label", path=tmp_path_factory.mktemp("timm") / "p", enable_progress_bar=False)
    return predictor.fit(images[:240], hyperparameters={"model.names": ["timm_image"], **TIMM, **SMALL}, seed=0)


def test_column_roles_are_inferred_as_automm_does_and_can_be_set(digits):
    roles = column_roles(digits, ["label"])
    assert roles == {"image": "image_path", "image_bytes": "image_bytes", "parity": "categorical",
                     "ink": "numerical", "caption": "categorical"}  # 10 captions over 400 rows: categories
    wordy = digits.assign(caption=digits["caption"] + " #" + digits.index.astype(str))
    assert column_roles(wordy, ["label"])["caption"] == "text"
    assert column_roles(digits, ["label"], {"caption": "text", "ink": "categorical"})["caption"] == "text"
    with pytest.raises(InvalidInput, match=r"column_types\.colour: no such column"):
        column_roles(digits, ["label"], {"colour": "text"})
    with pytest.raises(InvalidInput, match=r"column_types\.ink: unknown column type 'number'"):
        column_roles(digits, ["label"], {"ink": "number"})


def test_timm_image_fit_evaluate_predict_and_dump(timm_predictor, images, tmp_path):
    test = images[300:380].sample(frac=1.0, random_state=1)
    assert timm_predictor.column_types == {"image": "image_path"}  # a path column is not taken as text
    scores = timm_predictor.evaluate(test)
    assert set(scores) == {"accuracy", "f1", "log_loss"} and all(np.isfinite(list(scores.values())))
    predictions = timm_predictor.predict(test)
    assert predictions.index.equals(test.index) and set(predictions) <= set(range(10))
    assert (predictions == test["label"]).mean() == pytest.approx(scores["accuracy"])
    probabilities = timm_predictor.predict_proba(test)
    assert list(probabilities.columns) == list(range(10)) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    # images given as bytes predict the same as the same images given as paths
    as_bytes = test.assign(image=[Path(path).read_bytes() for path in test["image"]])
    assert timm_predictor.predict(as_bytes).tolist() == predictions.tolist()
    assert Predictor.load(timm_predictor.path).predict(test).tolist() == predictions.tolist()

    dump = tmp_path / "dump"
    timm_predictor.dump_model(dump)
    assert dumped_files(dump) == {"timm_image/config.json", "timm_image/model.safetensors"}
    model = load_timm_dump(dump / "timm_image")
    trained = best_weights(timm_predictor.path)
    prefix = "backbones.timm_image.model."
    assert {prefix + key for key in model.state_dict()} == {key for key in trained if key.startswith(prefix)}
    assert all(torch.equal(value, trained[prefix + key]) for key, value in model.state_dict().items())


def test_a_new_task_from_the_timm_dump_starts_from_its_weights(timm_predictor, digits, tmp_path):
    """Use case 3: a regression on the digit's ink from the dumped image backbone, with bytes columns."""
    dump = Path(timm_predictor.dump_model(tmp_path / "dump"))
    from_dump = TimmImageBackbone("timm_image", TimmImageOptions(str(dump / "timm_image")), ["image_bytes"])
    assert from_dump.processor.image_size == 32 != TimmImageBackbone(
        "timm_image", TimmImageOptions("test_resnet"), ["image_bytes"]).processor.image_size, \
        "without image_size, a dump's images keep the size it was trained at (AutoMM reads it from the dump too)"
    ink = digits[["image_bytes", "ink"]]
    hp = {"model.names": ["timm_image"], **TIMM, **SMALL, "optim.max_epochs": 1,
          "model.timm_image.checkpoint_name": str(dump / "timm_image")}
    new = Predictor(label="ink", path=tmp_path / "ink", enable_progress_bar=False)
    new.fit(ink[:160], hyperparameters=hp, seed=0)
    assert new.problem.problem_type == "regression" and new.column_types == {"image_bytes": "image_bytes"}
    assert set(new.evaluate(ink[300:340])) == {"rmse", "mae", "r2", "pearsonr", "spearmanr"}
    assert np.isfinite(new.predict(ink[300:340])).all()
    # its starting point (the resume point before the first step) holds the dumped weights, and a fresh head
    first = torch.load(Path(new.path) / "model.ckpt", weights_only=True)["state_dict"]
    assert first["head.weight"].shape == (1, 96)
    started = load_timm_dump(dump / "timm_image").state_dict()
    untouched = [key for key in started if "running" not in key and "num_batches" not in key]
    assert untouched and not all(torch.equal(started[k], first["backbones.timm_image.model." + k]) for k in untouched), \
        "a fitted predictor's weights must have moved from the dump"


@pytest.fixture(scope="module")
def fusion_predictor(tmp_path_factory, digits, tiny_bert) -> Predictor:
    hp = {**TIMM, **SMALL, "model.hf_text.checkpoint_name": tiny_bert, "model.hf_text.max_text_len": 16,
          "model.hf_text.pooling_mode": "mean", "optim.max_epochs": 4}
    predictor = Predictor(label="label", path=tmp_path_factory.mktemp("fusion") / "p", enable_progress_bar=False)
    data = digits[["image", "caption", "ink", "parity", "label"]]
    return predictor.fit(data[:240], hyperparameters=hp, seed=0, column_types={"caption": "text"})


def test_fusion_of_text_image_and_tabular_columns(fusion_predictor, digits, tmp_path, tiny_bert):
    assert fusion_predictor.column_types == {"image": "image_path", "caption": "text", "ink": "numerical",
                                             "parity": "categorical"}
    weights = best_weights(fusion_predictor.path)
    assert {key.split(".")[1] for key in weights if key.startswith("backbones.")} == {
        "hf_text", "timm_image", "numerical_mlp", "categorical_mlp"}
    assert any(key.startswith("head.adapters.") for key in weights), "several backbones are fused by fusion_mlp"
    test = digits[300:380]
    scores = fusion_predictor.evaluate(test)
    assert scores["accuracy"] > 0.5, f"the caption names the digit; the fusion model should learn that: {scores}"
    assert (fusion_predictor.predict(test) == test["label"]).mean() == pytest.approx(scores["accuracy"])

    dump = Path(fusion_predictor.dump_model(tmp_path / "dump"))
    files = dumped_files(dump)
    assert {"hf_text/model.safetensors", "hf_text/config.json", "timm_image/model.safetensors"} <= files
    assert {path.split("/")[0] for path in files} == {"hf_text", "timm_image"}, "towers are not dumped (AutoMM)"
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(dump / "hf_text").state_dict()
    assert all(torch.equal(value, weights["backbones.hf_text.encoder." + key]) for key, value in encoder.items())
    load_timm_dump(dump / "timm_image")

    # a new task (parity) on both dumped backbones
    hp = {**TIMM, **SMALL, "optim.max_epochs": 1, "model.hf_text.checkpoint_name": str(dump / "hf_text"),
          "model.timm_image.checkpoint_name": str(dump / "timm_image"), "model.hf_text.max_text_len": 16}
    parity = Predictor(label="parity", path=tmp_path / "parity", enable_progress_bar=False)
    parity.fit(digits[["image", "caption", "parity"]][:160], hyperparameters=hp, seed=0,
               column_types={"caption": "text"})
    assert parity.problem.problem_type == "binary" and parity.class_labels == ["even", "odd"]
    assert set(parity.predict(digits[300:340])) <= {"even", "odd"}


def test_a_family_or_problem_type_the_trainer_cannot_run_is_refused_naming_the_field(images, tmp_path):
    with pytest.raises(ValueError, match=r"hyperparameters\.model\.names: .*'vit_image'.* not supported"):
        Predictor(label="label", path=tmp_path / "a", hyperparameters={"model.names": ["vit_image"]})
    with pytest.raises(InvalidInput, match=r"problem_type: 'ranking' is not supported by this trainer"):
        Predictor(label="label", path=tmp_path / "b", problem_type="ranking").fit(images[:20])
    with pytest.raises(InvalidInput, match=r"model\.names: none of \['timm_image'\] can do 'object_detection'"):
        Predictor(label="label", path=tmp_path / "b", problem_type="object_detection").fit(
            images.assign(label=[[[0, 0, 4, 4, "digit"]]] * len(images))[:20],
            hyperparameters={**TIMM, "model.names": ["timm_image"]})
    with pytest.raises(InvalidInput, match=r"model\.timm_image\.checkpoint_name: 'no_such_net' is neither"):
        Predictor(label="label", path=tmp_path / "c").fit(
            images[:20], hyperparameters={**TIMM, "model.timm_image.checkpoint_name": "no_such_net"})
    with pytest.raises(InvalidInput, match=r"data: no column any model can use"):
        Predictor(label="label", path=tmp_path / "d").fit(images[:20], hyperparameters={"model.names": ["hf_text"]})
    assert not (tmp_path / "c" / "kontinue.json").exists(), "nothing is written for a refused fit"


def test_images_and_a_dump_in_s3_through_the_storage_layer(timm_predictor, digits, s3_server, monkeypatch, tmp_path):
    """Image cells as s3:// URIs and model.timm_image.checkpoint_name as an s3:// dump, over HTTP."""
    for key, value in s3_server.environ.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket("images")
    store = open_store(f"s3://{bucket}")
    rows = digits[:120]
    for path in rows["image"]:
        store.put_file(f"digits/{Path(path).name}", path)
    table = rows[["label"]].assign(image=[f"s3://{bucket}/digits/{Path(path).name}" for path in rows["image"]])
    dump = Path(timm_predictor.dump_model(tmp_path / "dump"))
    store.sync_up(dump / "timm_image", "dumps/timm_image")

    predictor = Predictor(label="label", path=tmp_path / "from-s3", enable_progress_bar=False)
    predictor.fit(table[:96], seed=0, hyperparameters={
        "model.names": ["timm_image"], **TIMM, **SMALL, "optim.max_epochs": 1, "optim.lr": 0.0,
        "model.timm_image.checkpoint_name": f"s3://{bucket}/dumps/timm_image"})
    assert predictor.column_types == {"image": "image_path"}
    local = table.assign(image=rows["image"].tolist())
    assert predictor.predict(table[96:]).tolist() == predictor.predict(local[96:]).tolist()
    started = load_timm_dump(dump / "timm_image").state_dict()
    trained = best_weights(predictor.path)  # lr 0: the weights are the dump's
    assert all(torch.equal(value, trained["backbones.timm_image.model." + key]) for key, value in started.items()
               if "running" not in key and "num_batches" not in key)


def test_a_dump_written_again_to_the_same_s3_uri_is_fetched_again(s3_server, monkeypatch, tmp_path):
    """The local copy of an s3:// checkpoint_name follows the objects, not the URI alone."""
    for key, value in s3_server.environ.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.make_bucket("dumps")
    uri = f"s3://{bucket}/timm_image"
    store = open_store(uri)
    store.put_bytes("config.json", b'{"architecture": "first"}')
    first = Path(resolve_checkpoint_name(uri))
    assert resolve_checkpoint_name(uri) == str(first), "an unchanged dump is fetched once"
    store.put_bytes("config.json", b'{"architecture": "second, longer"}')
    again = Path(resolve_checkpoint_name(uri))
    assert json.loads((again / "config.json").read_text())["architecture"] == "second, longer"
    assert json.loads((first / "config.json").read_text())["architecture"] == "first"
    with pytest.raises(InvalidInput, match=r"checkpoint_name: .*holds no files"):
        resolve_checkpoint_name(f"s3://{bucket}/nothing-here")


def test_a_repeated_family_takes_a_numeric_suffix_with_its_own_options_and_dump(images, tmp_path):
    """AutoMM's timm_image_1: a second image backbone, its own checkpoint_name, its own dump folder."""
    hp = {**TIMM, **SMALL, "optim.max_epochs": 1, "model.names": ["timm_image", "timm_image_1", "fusion_mlp"],
          "model.timm_image_1.checkpoint_name": "test_efficientnet"}
    predictor = Predictor(label="label", path=tmp_path / "two", enable_progress_bar=False)
    predictor.fit(images[:64], hyperparameters=hp, seed=0)
    dump = Path(predictor.dump_model(tmp_path / "dump"))
    assert {path.name for path in dump.iterdir()} == {"timm_image", "timm_image_1"}
    assert json.loads((dump / "timm_image_1" / "config.json").read_text())["architecture"] == "test_efficientnet"
    assert json.loads((dump / "timm_image" / "config.json").read_text())["architecture"] == "test_resnet"
    assert Predictor.load(predictor.path).predict(images[64:72]).tolist() == predictor.predict(images[64:72]).tolist()
    with pytest.raises(ValueError, match=r"model\.timm_image_1\.image_sise: unknown hyperparameter"):
        Predictor(label="label", hyperparameters={"model.timm_image_1.image_sise": 32})
