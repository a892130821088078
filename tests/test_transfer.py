"""TransferRun (AutoGluon's use case 3) through `kontinue train`: a new task on the dumped backbone
of a TrainingRun, resumed exactly after preemption, with the tiny BERT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kontinue.storage import open_store
from kontinue.trainer.callbacks import PREEMPTED_EXIT_CODE
from kontinue.trainer.predictor import Predictor
from tests.trainer_fixtures import Trainer, training_run

ENCODER = "backbones.hf_text.encoder."


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def encoder_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(Path(run_dir) / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return {key[len(ENCODER):]: value for key, value in state.items() if key.startswith(ENCODER)}


def encoder_weights_of(transformers_dir: str | Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    return AutoModel.from_pretrained(transformers_dir).state_dict()


def transfer_run(name: str, store: Path, data: dict[str, str], source: dict[str, str], **spec) -> dict:
    """Text length as a regression target: a task other than the source's sentiment."""
    hyperparameters = {"optim.max_epochs": 1, "env.per_gpu_batch_size": 8, "env.batch_size": 16,
                       "optim.lr": 1e-3, **spec.pop("hyperparameters", {})}
    return {
        "apiVersion": "kontinue.dev/v1alpha1", "kind": "TransferRun",
        "metadata": {"name": name, "namespace": "tests"},
        "spec": {"source": source, "task": {"label": "length", "problemType": "regression", "evalMetric": "rmse"},
                 "data": data, "hyperparameters": hyperparameters, "seed": 7,
                 "checkpoint": {"storage": str(store), "intervalSteps": 3}, **spec},
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("transfer") / "store"


@pytest.fixture(scope="module")
def length_tables(tmp_path_factory, reviews) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lengths")
    lengths = reviews[["text"]].assign(length=reviews["text"].str.len() / 100.0)
    paths = {"train": root / "train.parquet", "validation": root / "validation.parquet"}
    lengths[400:560].to_parquet(paths["train"])
    lengths[560:600].to_parquet(paths["validation"])
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def source(store, tmp_path_factory, tiny_bert, review_tables) -> Path:
    """A sentiment TrainingRun, trained and dumped by `kontinue train` into the store."""
    run_dir = store / "tests" / "sentiment"
    manifest = training_run("sentiment", str(store), review_tables, tiny_bert, hyperparameters={"optim.max_epochs": 1})
    attempt = Trainer(tmp_path_factory.mktemp("source")).attempt(manifest, str(run_dir))
    assert attempt.exit_code == 0, attempt.output[-3000:]
    assert read_json(run_dir / "status.json")["dumpedModel"] == (run_dir / "dump").as_uri()
    trained, untrained = encoder_weights(run_dir), encoder_weights_of(tiny_bert)
    assert not all(torch.equal(trained[key], untrained[key]) for key in trained), "the source learned nothing"
    return run_dir


@pytest.fixture(scope="module")
def reference(store, source, length_tables, tmp_path_factory) -> tuple[dict, Path, dict]:
    """The TransferRun from `source.trainingRun`, never interrupted; with its termination message."""
    workdir = tmp_path_factory.mktemp("reference")
    termination_log = workdir / "termination-log"
    manifest = transfer_run("lengths", store, length_tables, {"trainingRun": source.name})
    run_dir = store / "tests" / "lengths"
    attempt = Trainer(workdir, {"KONTINUE_TERMINATION_LOG": str(termination_log)}).attempt(manifest, str(run_dir))
    assert attempt.exit_code == 0, attempt.output[-3000:]
    return manifest, run_dir, read_json(termination_log)


def test_transfer_run_trains_a_new_task_on_the_source_dump(reference, source, length_tables):
    _, run_dir, message = reference
    status = read_json(run_dir / "status.json")
    assert status["phase"] == "Succeeded"
    assert status["sourceDumpUri"] == (source / "dump").as_uri()
    metadata = read_json(run_dir / "kontinue.json")
    hyperparameters = metadata["hyperparameters"]
    assert metadata["columns"] == {"hf_text": ["text"]}  # the models built: the text column has no other
    assert hyperparameters["model.hf_text.checkpoint_name"] == str(source / "dump" / "hf_text")
    assert message["result"] == "succeeded" and message["step"] == status["finalState"]["step"]
    assert message["model"] == (run_dir / "model.ckpt").as_uri()
    assert message["dump"] == (run_dir / "dump").as_uri() and (run_dir / "dump" / "hf_text").is_dir()
    assert message["scores"] == status["metrics"] and set(status["metrics"]) >= {"rmse"}
    predictions = Predictor.load(run_dir).predict(length_tables["validation"])
    assert predictions.dtype == np.float64 and np.isfinite(predictions).all()


def test_preempted_transfer_run_resumes_from_its_own_checkpoint_and_ends_identical(
        reference, source, store, tmp_path):
    manifest, reference_dir, _ = reference
    manifest = {**manifest, "metadata": {**manifest["metadata"], "name": "lengths-preempted"}}
    run_dir = store / "tests" / "lengths-preempted"
    harness = Trainer(tmp_path)
    stopped = harness.attempt(manifest, str(run_dir), preempt_after_step=2)
    assert stopped.exit_code == PREEMPTED_EXIT_CODE, stopped.output[-3000:]
    total = read_json(reference_dir / "status.json")["finalState"]["step"]
    assert read_json(run_dir / "status.json")["lastCheckpoint"]["step"] < total, "finished before the preemption"

    hidden = source.with_name("sentiment-hidden")
    source.rename(hidden)  # the resume must load from the run directory, not from the source again
    try:
        final = harness.attempt(manifest, str(run_dir))
    finally:
        hidden.rename(source)
    assert final.exit_code == 0, final.output[-3000:]
    status = read_json(run_dir / "status.json")
    assert status["finalState"] == read_json(reference_dir / "status.json")["finalState"]
    assert [attempt["outcome"] for attempt in status["attempts"]] == ["preempted", "completed"]
    assert status["sourceDumpUri"] == (source / "dump").as_uri()


def test_a_backbone_the_source_lacks_is_invalid_input(source, store, length_tables, tmp_path):
    manifest = transfer_run("images", store, length_tables, {"trainingRun": source.name}, backbones=["timm_image"])
    run_dir = store / "tests" / "images"
    attempt = Trainer(tmp_path).attempt(manifest, str(run_dir))
    assert attempt.exit_code == 2, attempt.output[-3000:]
    assert "spec.backbones: the source" in attempt.output and "no timm_image backbone" in attempt.output
    assert not (run_dir / "kontinue.json").exists()


@pytest.mark.parametrize("dumped", [True, False], ids=["dumped", "not-dumped"])
def test_model_uri_source_starts_from_its_dumped_encoder(dumped, source, store, length_tables, tmp_path):
    """With lr 0 the encoder keeps the weights it started from: the source's, whether the source
    run dumped them or the trainer has to."""
    model_uri = source
    if not dumped:
        model_uri = tmp_path / "undumped"
        shutil.copytree(source, model_uri, ignore=shutil.ignore_patterns("dump"))
        status = read_json(model_uri / "status.json")
        del status["dumpedModel"]
        (model_uri / "status.json").write_text(json.dumps(status))
    name = f"from-uri-{'dumped' if dumped else 'undumped'}"
    manifest = transfer_run(name, store, length_tables, {"modelUri": str(model_uri)},
                            hyperparameters={"optim.lr": 0.0, "optim.max_steps": 2})
    run_dir = store / "tests" / name
    attempt = Trainer(tmp_path).attempt(manifest, str(run_dir))
    assert attempt.exit_code == 0, attempt.output[-3000:]
    status = read_json(run_dir / "status.json")
    assert status["phase"] == "Succeeded"
    assert status["sourceDumpUri"] == ((source / "dump").as_uri() if dumped
                                       else (tmp_path / "scratch" / "source-dump").as_uri())
    started, dumped_encoder = encoder_weights(run_dir), encoder_weights_of(source / "dump" / "hf_text")
    assert started.keys() == dumped_encoder.keys()
    assert all(torch.equal(started[key], dumped_encoder[key]) for key in started)


def test_a_backbone_in_spec_model_replaces_the_source_one(source, store, length_tables, tiny_bert, tmp_path):
    manifest = transfer_run("replaced", store, length_tables, {"trainingRun": source.name},
                            model={"hfText": {"checkpoint": tiny_bert}},
                            hyperparameters={"optim.lr": 0.0, "optim.max_steps": 2})
    run_dir = store / "tests" / "replaced"
    attempt = Trainer(tmp_path).attempt(manifest, str(run_dir))
    assert attempt.exit_code == 0, attempt.output[-3000:]
    assert read_json(run_dir / "kontinue.json")["hyperparameters"]["model.hf_text.checkpoint_name"] == tiny_bert
    started, untrained = encoder_weights(run_dir), encoder_weights_of(tiny_bert)
    assert all(torch.equal(started[key], untrained[key]) for key in started), "spec.model's, not the source's"


def test_a_source_in_s3_is_fetched(source, store, length_tables, s3_server, tmp_path):
    bucket = s3_server.make_bucket("sources")
    open_store(f"s3://{bucket}/runs/sentiment", environ=s3_server.environ).sync_up(source, "")
    manifest = transfer_run("from-s3", store, length_tables, {"modelUri": f"s3://{bucket}/runs/sentiment"},
                            hyperparameters={"optim.lr": 0.0, "optim.max_steps": 2})
    run_dir = store / "tests" / "from-s3"
    attempt = Trainer(tmp_path, s3_server.environ).attempt(manifest, str(run_dir))
    assert attempt.exit_code == 0, attempt.output[-3000:]
    assert read_json(run_dir / "status.json")["sourceDumpUri"] == f"s3://{bucket}/runs/sentiment/dump"
    started, dumped_encoder = encoder_weights(run_dir), encoder_weights_of(source / "dump" / "hf_text")
    assert all(torch.equal(started[key], dumped_encoder[key]) for key in started)
