"""The Predictor used as AutoGluon's MultiModalPredictor is: fit / evaluate / predict / load / save,
the three continuous-training use cases, interruption and resume, and clear errors.

Real training throughout (a tiny BERT for plumbing, the real MiniLM for use case 3); nothing is mocked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from kontinue.trainer.callbacks import PREEMPTED_EXIT_CODE, Preempted
from kontinue.trainer.predictor import Predictor
from tests.trainer_fixtures import has_no_resume_points, resume_points

REPO = Path(__file__).resolve().parents[1]
BINARY_METRICS = {"accuracy", "f1", "roc_auc", "log_loss"}
PICKLE_SUFFIXES = {".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt"}


# -- helpers -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hp(tiny_bert) -> dict:
    """2 epochs of 9 steps on 160 rows (10% held out); validation every half epoch."""
    return {"model.hf_text.checkpoint_name": tiny_bert, "model.hf_text.max_text_len": 64,
            "optim.max_epochs": 2, "env.per_gpu_batch_size": 16, "env.batch_size": 16, "optim.lr": 1e-3}


@pytest.fixture(scope="module")
def test_data(reviews) -> pd.DataFrame:
    """Rows never trained on, in shuffled order, so the index is not 0..n-1."""
    return reviews[400:480].sample(frac=1.0, random_state=1)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, reviews, hp) -> Predictor:
    """A finished binary sentiment predictor; tests must not fit it again (they load copies)."""
    predictor = Predictor(label="label", eval_metric="acc", path=tmp_path_factory.mktemp("fitted") / "predictor",
                          enable_progress_bar=False)
    assert predictor.fit(reviews[:160], time_limit=300, hyperparameters=hp, seed=0) is predictor
    return predictor


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return {}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights(path: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(path) / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@contextlib.contextmanager
def sigterm_when(condition, timeout: float = 120):
    """Sends this process SIGTERM, as a kubelet would, once `condition()` holds.

    A no-op handler is installed meanwhile so a SIGTERM that arrives when training has already
    ended makes the test fail instead of killing pytest.
    """
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    done = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not done.is_set() and time.monotonic() < deadline:
            if condition():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            done.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGTERM, previous)


def has_checkpoint(path: Path, min_step: int = 0, best: bool = False):
    def check() -> bool:
        status = read_json(path / "status.json")
        return (status.get("lastCheckpoint", {}).get("step", -1) >= min_step
                and (not best or "bestCheckpoint" in status))
    return check


# -- the AutoMM-shaped API -------------------------------------------------------------------------------
def test_fit_evaluate_predict_and_predict_proba(fitted, test_data, review_tables):
    status = read_json(Path(fitted.path) / "status.json")
    assert status["phase"] == "Succeeded"
    assert fitted.fit_summary["eval_metric"] == "accuracy"  # "acc" is AutoMM's alias
    assert fitted.class_labels == [0, 1]

    scores = fitted.evaluate(test_data)
    assert set(scores) == BINARY_METRICS
    assert all(np.isfinite(value) for value in scores.values())
    assert 0.0 <= scores["accuracy"] <= 1.0
    assert fitted.evaluate(test_data, metrics=["f1"]) == pytest.approx({"f1": scores["f1"]})
    assert fitted.evaluate(test_data, metrics="acc") == pytest.approx({"accuracy": scores["accuracy"]})

    predictions = fitted.predict(test_data)
    assert isinstance(predictions, pd.Series) and predictions.name == "label"
    assert predictions.index.equals(test_data.index)
    assert set(predictions) <= {0, 1}
    assert predictions.dtype == test_data["label"].dtype  # labels come back as the label's own values
    assert (predictions == test_data["label"]).mean() == pytest.approx(scores["accuracy"])

    probabilities = fitted.predict_proba(test_data)
    assert isinstance(probabilities, pd.DataFrame)
    assert list(probabilities.columns) == [0, 1]
    assert probabilities.index.equals(test_data.index)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert ((probabilities >= 0) & (probabilities <= 1)).all().all()
    assert probabilities.idxmax(axis=1).tolist() == predictions.tolist()
    positive = fitted.predict_proba(test_data, as_multiclass=False)
    assert isinstance(positive, pd.Series)
    assert np.allclose(positive, probabilities[1])

    # AutoMM also takes a table's path instead of a DataFrame
    from_file = fitted.predict(review_tables["test"])
    assert len(from_file) == 80 and set(from_file) <= {0, 1}


def test_load_and_save_give_identical_predictions(fitted, test_data, tmp_path):
    expected, expected_proba = fitted.predict(test_data), fitted.predict_proba(test_data)

    loaded = Predictor.load(fitted.path)
    assert loaded.path == fitted.path and loaded.label == "label" and loaded.class_labels == [0, 1]
    pd.testing.assert_series_equal(loaded.predict(test_data), expected)
    pd.testing.assert_frame_equal(loaded.predict_proba(test_data), expected_proba, check_exact=False, rtol=1e-6)

    loaded.save(tmp_path / "copy")
    assert {"kontinue.json", "model.ckpt", "assets"} <= {p.name for p in (tmp_path / "copy").iterdir()}
    copy = Predictor.load(tmp_path / "copy")
    assert Path(copy.path) == tmp_path / "copy"
    pd.testing.assert_series_equal(copy.predict(test_data), expected)
    pd.testing.assert_frame_equal(copy.predict_proba(test_data), expected_proba, check_exact=False, rtol=1e-6)
    assert copy.evaluate(test_data) == pytest.approx(fitted.evaluate(test_data))


# -- use case 1: more data / more training time -----------------------------------------------------------
def test_use_case_1_load_and_fit_continues_from_the_fitted_weights_into_a_new_path(
        fitted, reviews, test_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a continued fit picks a new path under ./KontinueModels/, as AutoMM's does
    old = Path(fitted.path)
    old_files = {p.name: sha256(p) for p in old.iterdir() if p.is_file()}
    original = fitted.predict_proba(test_data)
    new_data = reviews[160:320]

    # with a learning rate of 0 the continued weights must be exactly the fitted ones (not checkpoint_name's)
    frozen = Predictor.load(old)
    assert frozen.fit(new_data, time_limit=120, hyperparameters={"optim.lr": 0.0, "optim.max_epochs": 1}) is frozen
    assert Path(frozen.path) != old and Path(frozen.path).is_relative_to(tmp_path / "KontinueModels")
    fitted_weights, frozen_weights = weights(old), weights(frozen.path)
    assert fitted_weights.keys() == frozen_weights.keys()
    assert all(torch.equal(fitted_weights[key], frozen_weights[key]) for key in fitted_weights)

    continued = Predictor.load(old)
    continued.fit(new_data, time_limit=120, hyperparameters={"optim.max_epochs": 1})
    assert Path(continued.path) not in (old, Path(frozen.path))
    assert read_json(Path(continued.path) / "status.json")["phase"] == "Succeeded"
    changed = continued.predict_proba(test_data)
    assert not np.allclose(changed.to_numpy(), original.to_numpy(), atol=1e-4), "more training changed nothing"
    assert set(continued.predict(test_data)) <= {0, 1}
    pd.testing.assert_frame_equal(Predictor.load(continued.path).predict_proba(test_data), changed,
                                  check_exact=False, rtol=1e-6)

    # the original predictor is untouched
    assert {p.name: sha256(p) for p in old.iterdir() if p.is_file()} == old_files
    pd.testing.assert_frame_equal(Predictor.load(old).predict_proba(test_data), original, check_exact=False, rtol=1e-6)


def test_predicting_before_continuing_does_not_change_what_is_learned(fitted, reviews, test_data, tmp_path,
                                                                      monkeypatch):
    """predict() puts the model in eval mode; the continued fit must still train with dropout on."""
    monkeypatch.chdir(tmp_path)
    new_data, more = reviews[160:320], {"optim.max_epochs": 1}
    after_predict = Predictor.load(fitted.path)
    after_predict.predict(test_data)
    after_predict.fit(new_data, hyperparameters=more, seed=0)
    straight = Predictor.load(fitted.path)
    straight.fit(new_data, hyperparameters=more, seed=0)
    ours, theirs = weights(after_predict.path), weights(straight.path)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], msg=f"{key} differs")


# -- use case 2: resume an interrupted fit -------------------------------------------------------------------
@pytest.fixture(scope="module")
def resume_hp(hp) -> dict:
    """Validation only at the end of each epoch, so an early stop leaves no model.ckpt yet."""
    return {**hp, "optim.val_check_interval": 1.0, "env.checkpoint_every_n_steps": 3}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, reviews, resume_hp) -> Predictor:
    predictor = Predictor(label="label", eval_metric="acc", path=tmp_path_factory.mktemp("reference") / "run",
                          enable_progress_bar=False)
    return predictor.fit(reviews[:160], time_limit=300, hyperparameters=resume_hp, seed=0)


def assert_same_as(path: Path, reference: Predictor) -> dict:
    status, expected = read_json(path / "status.json"), read_json(Path(reference.path) / "status.json")
    assert status["phase"] == "Succeeded"
    assert status["finalState"] == expected["finalState"], "the resumed run did not end bit-identical"
    assert status["metrics"] == expected["metrics"]
    assert has_no_resume_points(path)
    return status


def test_use_case_2_sigterm_then_load_resume_true_and_fit_finishes_exactly(
        tmp_path, reviews, resume_hp, uninterrupted, test_data):
    path, data = tmp_path / "run", reviews[:160]
    predictor = Predictor(label="label", eval_metric="acc", path=path, enable_progress_bar=False)
    # At the first durable point (step 0), so the stop comes well before the first validation
    # (after step 5) even when the writer, at a lower priority, is slow on a busy machine.
    with sigterm_when(has_checkpoint(path, min_step=0)), pytest.raises(Preempted) as stop:
        predictor.fit(data, time_limit=300, hyperparameters=resume_hp, seed=0)
    assert stop.value.code == PREEMPTED_EXIT_CODE == 75
    status = read_json(path / "status.json")
    assert status["phase"] == "Preempted"
    assert status["lastCheckpoint"]["step"] == stop.value.step < read_json(
        Path(uninterrupted.path) / "status.json")["finalState"]["step"]
    assert resume_points(path)[0]["step"] == stop.value.step and not (path / "model.ckpt").exists()

    # an unfinished fit has no model to load, only a fit to continue
    with pytest.raises(FileNotFoundError, match=r"no model\.ckpt yet; use resume=True"):
        Predictor.load(path)
    resumed = Predictor.load(path, resume=True)
    assert resumed.fit(data) is resumed  # AutoMM: load(path, resume=True).fit(the same data)

    status = assert_same_as(path, uninterrupted)
    first, second = status["attempts"]
    assert (first["outcome"], second["outcome"]) == ("preempted", "completed")
    assert first["fromStep"] == 0 and second["fromStep"] == first["toStep"] == stop.value.step
    pd.testing.assert_frame_equal(resumed.predict_proba(test_data), uninterrupted.predict_proba(test_data),
                                  check_exact=False, rtol=1e-6)

    with pytest.raises(ValueError, match=r"path: .* is already completed; load it with resume=False"):
        Predictor.load(path, resume=True)
    pd.testing.assert_series_equal(Predictor.load(path).predict(test_data), resumed.predict(test_data))


FIT_SCRIPT = """
import json, sys
import pandas as pd
from kontinue.trainer.predictor import Predictor
Predictor(label="label", eval_metric="acc", path=sys.argv[1], enable_progress_bar=False).fit(
    pd.read_parquet(sys.argv[2]), time_limit=300, hyperparameters=json.loads(sys.argv[3]), seed=0)
"""


def test_metadata_is_written_before_the_first_step(tmp_path, reviews, resume_hp, uninterrupted):
    """SIGTERM as soon as kontinue.json appears: wherever that lands in the set-up, the run can be resumed."""
    path, data = tmp_path / "run", reviews[:160]
    data.to_parquet(tmp_path / "train.parquet")
    process = subprocess.Popen([sys.executable, "-c", FIT_SCRIPT, str(path), str(tmp_path / "train.parquet"),
                                json.dumps(resume_hp)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (path / "kontinue.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    # killed during set-up (before any handler is installed), or stopped at the step-0 resume point
    assert process.returncode in (PREEMPTED_EXIT_CODE, -signal.SIGTERM), output[-3000:]

    metadata = read_json(path / "kontinue.json")
    assert metadata["label"] == "label"
    assert metadata["hyperparameters"]["model.hf_text.checkpoint_name"] == resume_hp["model.hf_text.checkpoint_name"]
    assert (path / "assets" / "hf_text" / "tokenizer.json").exists()
    with pytest.raises(FileNotFoundError, match="use resume=True"):
        Predictor.load(path)
    Predictor.load(path, resume=True).fit(data)
    assert_same_as(path, uninterrupted)


# -- clear errors --------------------------------------------------------------------------------------------
def test_invalid_input_is_rejected_with_the_field_named(tmp_path, reviews, hp, fitted, test_data):
    train = reviews[:40]

    def rejected(path_name: str, error: type, pattern: str, label="label", eval_metric=None, **fit_args):
        path = tmp_path / path_name
        with pytest.raises(error, match=pattern):
            Predictor(label=label, eval_metric=eval_metric, path=path).fit(train, **fit_args)
        assert not (path / "kontinue.json").exists() and not (path / "last.ckpt").exists(), "it trained anyway"

    with pytest.raises(ValueError, match=r"hyperparameters\.optim\.lrr: unknown hyperparameter; did you mean "
                                         r"'optim\.lr'\?"):
        Predictor(label="label", hyperparameters={"optim.lrr": 1e-3})
    rejected("unknown-key", ValueError, r"hyperparameters\.optim\.lrr: .*'optim\.lr'",
             hyperparameters={**hp, "optim.lrr": 1e-3})
    rejected("bad-value", ValueError, r"hyperparameters\.optim\.lr: must be >= 0, got -1",
             hyperparameters={**hp, "optim.lr": -1})
    rejected("bad-type", ValueError, r"hyperparameters\.optim\.max_epochs: must be a number",
             hyperparameters={**hp, "optim.max_epochs": "two"})
    rejected("no-label", ValueError, r"label: the predictor needs the name of the label column",
             label=None, hyperparameters=hp)
    rejected("missing-label", ValueError, r"label: column 'sentiment' is not in the data \(columns: \['text', "
             r"'label'\]\)", label="sentiment", hyperparameters=hp)
    rejected("wrong-metric", ValueError, r"eval_metric: 'rmse' does not fit problem_type 'binary'",
             eval_metric="rmse", hyperparameters=hp)
    missing = tmp_path / "no-such-model"
    for name in (str(missing), missing.as_uri()):
        rejected("missing-checkpoint", ValueError,
                 rf"hyperparameters\.model\.hf_text\.checkpoint_name: cannot load '{re.escape(str(missing))}'.*"
                 r"never downloads from a model hub", hyperparameters={**hp, "model.hf_text.checkpoint_name": name})

    with pytest.raises(ValueError, match=r"metrics: 'rmse' does not fit problem_type 'binary'"):
        fitted.evaluate(test_data, metrics=["rmse"])
    with pytest.raises(ValueError, match=r"label: values \['maybe'\] were not seen in training"):
        fitted.evaluate(test_data.assign(label="maybe"))
    for unfitted in (lambda p: p.predict(test_data), lambda p: p.evaluate(test_data),
                     lambda p: p.predict_proba(test_data), lambda p: p.dump_model(tmp_path / "dump")):
        with pytest.raises(RuntimeError, match="the predictor is not fitted yet"):
            unfitted(Predictor(label="label"))


# -- other problem types ---------------------------------------------------------------------------------------
def test_regression(tmp_path, reviews, hp, test_data):
    def scored(frame: pd.DataFrame) -> pd.DataFrame:  # a float target: the review's length in 100s of characters
        return frame[["text"]].assign(score=frame["text"].str.len() / 100.0)

    predictor = Predictor(label="score", path=tmp_path / "regression", enable_progress_bar=False)
    predictor.fit(scored(reviews[:160]), hyperparameters={**hp, "optim.max_epochs": 1})
    assert predictor.problem.problem_type == "regression"
    assert predictor.fit_summary["eval_metric"] == "rmse"
    scores = predictor.evaluate(scored(test_data))
    assert set(scores) == {"rmse", "mae", "r2", "pearsonr", "spearmanr"}
    assert scores["rmse"] > 0 and np.isfinite(scores["rmse"])
    assert predictor.evaluate(scored(test_data), metrics=["rmse"]) == pytest.approx({"rmse": scores["rmse"]})
    predictions = predictor.predict(scored(test_data))
    assert predictions.dtype == np.float64 and predictions.index.equals(test_data.index)
    assert np.isfinite(predictions).all() and predictions.nunique() > 1
    with pytest.raises(ValueError, match="predict_proba: a regression predictor has no class probabilities"):
        predictor.predict_proba(scored(test_data))
    with pytest.raises(ValueError, match=r"eval_metric: 'accuracy' does not fit problem_type 'regression'"):
        Predictor(label="score", eval_metric="acc", path=tmp_path / "bad").fit(scored(reviews[:40]),
                                                                               hyperparameters=hp)


def test_multiclass(tmp_path, reviews, hp, test_data):
    def sized(frame: pd.DataFrame) -> pd.DataFrame:  # three classes by review length
        length = frame["text"].str.len()
        return frame[["text"]].assign(size=np.where(length < 90, "short", np.where(length < 140, "medium", "long")))

    train = sized(reviews[:160])
    assert train["size"].nunique() == 3
    predictor = Predictor(label="size", eval_metric="accuracy", path=tmp_path / "multiclass",
                          enable_progress_bar=False)
    predictor.fit(train, hyperparameters={**hp, "optim.max_epochs": 1})
    assert predictor.problem.problem_type == "multiclass"
    assert predictor.class_labels == ["long", "medium", "short"]
    scores = predictor.evaluate(sized(test_data))
    assert set(scores) == {"accuracy", "f1", "log_loss"} and 0.0 <= scores["accuracy"] <= 1.0
    predictions = predictor.predict(sized(test_data))
    assert predictions.index.equals(test_data.index) and set(predictions) <= {"long", "medium", "short"}
    probabilities = predictor.predict_proba(sized(test_data))
    assert list(probabilities.columns) == ["long", "medium", "short"]
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert probabilities.idxmax(axis=1).tolist() == predictions.tolist()
    with pytest.raises(ValueError, match=r"eval_metric: 'roc_auc' does not fit problem_type 'multiclass'"):
        Predictor(label="size", eval_metric="roc_auc", path=tmp_path / "bad").fit(train, hyperparameters=hp)


# -- use case 3: the dumped backbone starts a new task (the real MiniLM) ----------------------------------------
def test_use_case_3_dump_model_then_a_new_regression_task_from_the_dump(tmp_path, reviews, minilm_path):
    from transformers import AutoModel, AutoTokenizer

    small = {"model.hf_text.max_text_len": 64, "model.hf_text.pooling_mode": "mean", "optim.max_epochs": 1,
             "env.per_gpu_batch_size": 16, "env.batch_size": 16, "env.num_workers": 0}
    sentiment = Predictor(label="label", eval_metric="acc", path=tmp_path / "sst", enable_progress_bar=False)
    sentiment.fit(reviews[:200], time_limit=300, seed=0,
                  hyperparameters={**small, "model.hf_text.checkpoint_name": minilm_path})
    scores = sentiment.evaluate(reviews[400:480])
    assert set(scores) == BINARY_METRICS and 0.0 <= scores["accuracy"] <= 1.0

    status_before = (tmp_path / "sst" / "status.json").read_bytes()
    dump = tmp_path / "dump"
    assert sentiment.dump_model(save_path=dump) == str(dump)
    files = {str(p.relative_to(dump)) for p in dump.rglob("*") if p.is_file()}
    assert {"hf_text/model.safetensors", "hf_text/config.json", "hf_text/tokenizer.json"} <= files
    assert not [name for name in files if Path(name).suffix in PICKLE_SUFFIXES], f"pickles in the dump: {files}"
    assert (tmp_path / "sst" / "status.json").read_bytes() == status_before, "a dump elsewhere is not the run's"

    # plain transformers loads the dump, and it holds the predictor's trained encoder
    encoder = AutoModel.from_pretrained(dump / "hf_text")
    trained = weights(tmp_path / "sst")
    prefix = "backbones.hf_text.encoder."
    dumped = encoder.state_dict()
    assert set(dumped) == {key[len(prefix):] for key in trained if key.startswith(prefix)}
    assert all(torch.equal(dumped[key], trained[prefix + key]) for key in dumped)
    original = AutoModel.from_pretrained(minilm_path).state_dict()
    assert not all(torch.equal(original[key], dumped[key]) for key in dumped), "the dump is the untrained MiniLM"
    sentence = "A gripping, beautifully shot film."
    assert (AutoTokenizer.from_pretrained(dump / "hf_text")(sentence)["input_ids"]
            == AutoTokenizer.from_pretrained(minilm_path)(sentence)["input_ids"])

    # a new task (regression, as AutoMM's STS example) starts from the dumped backbone
    def scored(frame: pd.DataFrame) -> pd.DataFrame:
        return frame[["text"]].assign(score=frame["text"].str.len() / 100.0)

    sts = Predictor(label="score", path=tmp_path / "sts", enable_progress_bar=False)
    sts.fit(scored(reviews[200:296]), time_limit=300, seed=0,
            hyperparameters={**small, "model.hf_text.checkpoint_name": f"{dump}/hf_text"})
    assert sts.problem.problem_type == "regression"
    predictions = sts.predict(scored(reviews[400:440]))
    assert predictions.dtype == np.float64 and len(predictions) == 40 and np.isfinite(predictions).all()
    assert set(sts.evaluate(scored(reviews[400:440]))) == {"rmse", "mae", "r2", "pearsonr", "spearmanr"}


# -- checkpoints hold tensors and plain values only; a stop at a validation resumes exactly ------------------
@pytest.fixture(scope="module")
def validating_hp(hp) -> dict:
    """Validation after every step and a resume point every 2 steps: stops land on validations."""
    return {**hp, "optim.val_check_interval": 0.1, "env.checkpoint_every_n_steps": 2}


def stopped_after_a_validation(path: Path, data: pd.DataFrame, hyperparameters: dict) -> Preempted:
    """SIGTERM once a best model exists: the stop is taken at a later step's validation."""
    with sigterm_when(has_checkpoint(path, best=True)), pytest.raises(Preempted) as stop:
        Predictor(label="label", path=path, enable_progress_bar=False).fit(data, hyperparameters=hyperparameters)
    return stop.value


def best_model_state(checkpoint: dict) -> dict:
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("BestModel")]
    return state


def test_checkpoints_load_with_weights_only(tmp_path, reviews, validating_hp):
    """model.ckpt and both resume points load with torch.load(weights_only=True): no arbitrary unpickling."""
    path = tmp_path / "run"
    stop = stopped_after_a_validation(path, reviews[:160], validating_hp)
    status = read_json(path / "status.json")

    newest, predecessor = resume_points(path)
    last = torch.load(path / newest["key"], map_location="cpu", weights_only=True)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "global_step", "loops", "callbacks"} <= set(last)
    assert last["global_step"] == newest["step"] == status["lastCheckpoint"]["step"] == stop.step
    assert sha256(path / newest["key"]) == newest["sha256"] == status["lastCheckpoint"]["sha256"]
    assert (path / f"{newest['key']}.sha256").read_text().strip() == newest["sha256"]
    previous = torch.load(path / predecessor["key"], map_location="cpu", weights_only=True)
    assert previous["global_step"] == predecessor["step"] < last["global_step"]
    assert sorted(p.name for p in (path / "checkpoints").iterdir()) == sorted(
        name for point in (newest, predecessor) for name in (Path(point["key"]).name, Path(point["key"]).name + ".sha256"))
    best = torch.load(path / "model.ckpt", map_location="cpu", weights_only=True)
    assert set(best) == {"state_dict", "score", "step", "metrics"}
    assert best["step"] == status["bestCheckpoint"]["step"] and best["score"] == status["bestCheckpoint"]["score"]
    assert all(isinstance(value, torch.Tensor) for value in best["state_dict"].values())
    # the resume point knows about the best model on disk, including the validation it was taken at
    assert best_model_state(last) == {"best_score": best["score"], "best_step": best["step"]}

    # Lightning and transformers allow-list classes for weights_only loading once imported; a bare
    # torch process has only torch's defaults, so this proves the files need nothing else
    names = (newest["key"], predecessor["key"], "model.ckpt")
    bare = subprocess.run([sys.executable, "-c", "import sys, torch\nfor name in sys.argv[1:]: "
                           "torch.load(name, map_location='cpu', weights_only=True)", *names],
                          cwd=path, capture_output=True, text=True, timeout=120)
    assert bare.returncode == 0, bare.stderr[-3000:]


def test_stopped_at_a_validation_resumes_exactly(tmp_path, reviews, validating_hp, test_data):
    data = reviews[:160]
    reference = Predictor(label="label", path=tmp_path / "reference", enable_progress_bar=False)
    reference.fit(data, hyperparameters=validating_hp)
    path = tmp_path / "run"
    stopped_after_a_validation(path, data, validating_hp)
    Predictor.load(path, resume=True).fit(data)
    status = assert_same_as(path, reference)
    assert status["bestCheckpoint"] == {**read_json(Path(reference.path) / "status.json")["bestCheckpoint"],
                                        "uri": (path / "model.ckpt").as_uri()}
    ours, theirs = weights(path), weights(reference.path)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
