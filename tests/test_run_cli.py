"""`kontinue run` (a TrainingRun on this machine, Ctrl-C and rerun to resume) and `kontinue train`'s
termination message, as real subprocesses training the tiny BERT."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from kontinue.api.contract import INVALID_SPEC_EXIT_CODE, PREEMPTED_EXIT_CODE
from kontinue.trainer.predictor import Predictor
from tests.trainer_fixtures import Trainer, has_no_resume_points, resume_points, signal_when, training_run


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = directory / f"{manifest['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def kontinue(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kontinue", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def interrupted(command: list[str], status_file: Path, signum: int, *, cwd: Path, until=None,
                timeout: float = 300) -> tuple[int, str]:
    """Runs `command`, sends `signum` once `until(status)` holds (default: a resume point exists)."""
    until = until or (lambda status: "lastCheckpoint" in status)
    log = cwd / f"interrupted-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        code = signal_when(process, lambda: until(read_json(status_file)), signum, time.monotonic() + timeout)
    return code, log.read_text()


def test_run_stops_on_ctrl_c_and_the_same_command_resumes_it(tmp_path, tiny_bert, review_tables):
    store = tmp_path / "store"
    manifest = write_manifest(tmp_path, training_run("cli", str(store), review_tables, tiny_bert,
                                                     hyperparameters={"optim.max_epochs": 1}))
    command = [sys.executable, "-m", "kontinue", "run", str(manifest), "--store", str(store)]
    run_dir = store / "tests" / "cli"

    code, output = interrupted(command, run_dir / "status.json", signal.SIGINT, cwd=tmp_path)
    assert code == PREEMPTED_EXIT_CODE, output[-3000:]
    assert "Run the same command again to resume" in output
    stopped = read_json(run_dir / "status.json")
    assert stopped["phase"] == "Preempted" and resume_points(run_dir)[0]["step"] == stopped["lastCheckpoint"]["step"]
    assert f"Stopped at step {stopped['lastCheckpoint']['step']}" in output

    second = kontinue("run", str(manifest), "--store", str(store), cwd=tmp_path)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "Training finished" in second.stdout
    assert "validation: accuracy=" in second.stdout and "test: accuracy=" in second.stdout
    assert f"best model: {(run_dir / 'model.ckpt').as_uri()}" in second.stdout
    assert f"dumped backbones: {(run_dir / 'dump').as_uri()}" in second.stdout

    assert (run_dir / "model.ckpt").exists() and (run_dir / "dump" / "hf_text" / "model.safetensors").exists()
    assert (run_dir / "dump" / "hf_text" / "tokenizer.json").exists()
    assert has_no_resume_points(run_dir)
    status = read_json(run_dir / "status.json")
    assert status["phase"] == "Succeeded"
    assert set(status["testMetrics"]) >= {"accuracy", "roc_auc"}
    first, last = status["attempts"]
    assert (first["outcome"], last["outcome"]) == ("preempted", "completed")
    # chained: the second attempt starts where the first stopped (at step 0 if Ctrl-C beat the first step)
    assert first["fromStep"] == 0 and last["fromStep"] == first["toStep"] == stopped["lastCheckpoint"]["step"]
    assert last["toStep"] == status["finalState"]["step"]
    # the run directory is a predictor directory
    assert set(Predictor.load(run_dir).predict(review_tables["test"])) <= {0, 1}

    model = sha256(run_dir / "model.ckpt")
    third = kontinue("run", str(manifest), "--store", str(store), cwd=tmp_path)
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    assert "Training finished" in third.stdout
    assert read_json(run_dir / "status.json")["attempts"] == status["attempts"], "a finished run trained again"
    assert sha256(run_dir / "model.ckpt") == model


def test_run_rejects_an_invalid_manifest_and_trains_nothing(tmp_path, tiny_bert, review_tables):
    store = tmp_path / "store"
    manifest = write_manifest(tmp_path, training_run("bad", str(store), review_tables, tiny_bert,
                                                     hyperparameters={"optim.lrr": 1e-3}))
    result = kontinue("run", str(manifest), "--store", str(store), cwd=tmp_path)
    assert result.returncode not in (0, PREEMPTED_EXIT_CODE), result.stdout + result.stderr
    assert "spec.hyperparameters.optim.lrr" in result.stderr
    assert "optim.lr" in result.stderr.replace("optim.lrr", "")  # the close key is suggested
    assert not (store / "tests" / "bad").exists()


def test_train_exits_invalid_spec_on_data_no_model_can_use(tmp_path, tiny_bert, review_tables):
    """A spec that passes the API but that the trainer refuses on its data exits 2 with the reason in
    its termination message, so the operator fails the run as InvalidSpec instead of retrying it."""
    termination_log = tmp_path / "termination-log"
    harness = Trainer(tmp_path, {"KONTINUE_TERMINATION_LOG": str(termination_log)})
    manifest = training_run("images", str(tmp_path / "store"), review_tables, tiny_bert,
                            hyperparameters={"model.names": ["timm_image"]})
    manifest["spec"]["model"] = {"timmImage": {"checkpoint": "test_resnet"}}  # reviews have no image column
    attempt = harness.attempt(manifest, str(tmp_path / "store" / "tests" / "images"))
    assert attempt.exit_code == INVALID_SPEC_EXIT_CODE, attempt.output[-3000:]
    assert "invalid input: data: no column any model can use" in termination_log.read_text()


def test_train_writes_the_termination_message(tmp_path, tiny_bert, review_tables):
    termination_log = tmp_path / "termination-log"
    harness = Trainer(tmp_path, {"KONTINUE_TERMINATION_LOG": str(termination_log)})
    manifest = training_run("term", str(tmp_path / "store"), review_tables, tiny_bert,
                            hyperparameters={"optim.max_epochs": 1})
    run_dir = tmp_path / "store" / "tests" / "term"

    attempt = harness.attempt(manifest, str(run_dir), preempt_after_step=0)
    assert attempt.exit_code == PREEMPTED_EXIT_CODE, attempt.output[-3000:]
    message = json.loads(termination_log.read_text())
    assert message["result"] == "preempted"
    assert message["step"] == read_json(run_dir / "status.json")["lastCheckpoint"]["step"]
    assert message["run_dir"] == run_dir.as_uri() and message["model"] is None

    termination_log.unlink()
    final = harness.attempt(manifest, str(run_dir))
    assert final.exit_code == 0, final.output[-3000:]
    message = json.loads(termination_log.read_text())
    status = read_json(run_dir / "status.json")
    assert message["result"] == "succeeded"
    assert message["step"] == status["finalState"]["step"]
    assert message["model"] == (run_dir / "model.ckpt").as_uri()
    assert message["dump"] == (run_dir / "dump").as_uri()
    assert message["scores"] == status["metrics"] and message["test_scores"] == status["testMetrics"]
    assert len(termination_log.read_bytes()) <= 4096  # Kubernetes keeps 4 KiB of it


def test_continue_from_run_killed_before_its_first_resume_point_is_retried_in_its_run_directory(
        tmp_path, tiny_bert, review_tables, reviews):
    """A continueFrom run that died during set-up leaves kontinue.json but no checkpoint; the retry must
    train into the run directory again, not into a new ./KontinueModels/ path."""
    source = tmp_path / "source"
    Predictor(label="label", path=source, enable_progress_bar=False).fit(
        reviews[:100], hyperparameters={"model.hf_text.checkpoint_name": tiny_bert, "optim.max_epochs": 1,
                                        "env.per_gpu_batch_size": 16, "env.batch_size": 16})
    manifest = training_run("more", str(tmp_path / "store"), review_tables, tiny_bert,
                            hyperparameters={"optim.max_epochs": 1})
    del manifest["spec"]["model"]
    manifest["spec"]["continueFrom"] = {"modelUri": str(source)}
    spec = write_manifest(tmp_path, manifest)
    run_dir = tmp_path / "store" / "tests" / "more"
    command = [sys.executable, "-m", "kontinue", "train", "--spec", str(spec), "--run-dir", str(run_dir)]

    code, output = interrupted(command, run_dir / "status.json", signal.SIGKILL, cwd=tmp_path,
                               until=lambda status: (run_dir / "kontinue.json").exists())
    assert code == -signal.SIGKILL, output[-3000:]
    (run_dir / "last.json").unlink(missing_ok=True)  # in case the kill landed after the first resume point
    assert read_json(run_dir / "kontinue.json")["label"] == "label"

    retry = kontinue("train", "--spec", str(spec), "--run-dir", str(run_dir), cwd=tmp_path)
    assert retry.returncode == 0, (retry.stdout + retry.stderr)[-3000:]
    outcome = json.loads(retry.stdout.strip().splitlines()[-1])
    assert outcome["result"] == "succeeded" and outcome["model"] == (run_dir / "model.ckpt").as_uri()
    assert (run_dir / "model.ckpt").exists() and read_json(run_dir / "status.json")["phase"] == "Succeeded"
    assert (run_dir / "dump" / "hf_text" / "model.safetensors").exists()
    assert not (tmp_path / "KontinueModels").exists(), "the retry trained outside its run directory"
