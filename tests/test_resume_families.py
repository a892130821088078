"""Exact resume for every family, with image augmentation on and two data-loader workers: a run
SIGTERMed at random steps and resumed ends bit-identical to the uninterrupted run (CPU).

Workers fetch batches ahead, and augmentation draws random numbers in them; neither may leak into
what a resumed run trains on (the loader's position counts the batches it handed out, and each
sample's augmentation is seeded by run seed, epoch and row)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kontinue.api.contract import PREEMPTED_EXIT_CODE
from tests.test_resume import assert_same_outcome, finish, read_status
from tests.trainer_fixtures import Trainer, training_run

WORKERS = {"env.num_workers": 2}


@pytest.fixture(scope="module")
def digit_tables(tmp_path_factory, digits) -> dict[str, str]:
    root = tmp_path_factory.mktemp("digit-tables")
    paths = {"train": root / "train.parquet", "validation": root / "validation.parquet"}
    columns = ["image", "caption", "ink", "parity", "label"]
    digits[columns][:96].to_parquet(paths["train"])
    digits[columns][96:128].to_parquet(paths["validation"])
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def shape_files(shapes) -> dict[str, str]:
    """The detection data as COCO files (a TrainingRun's data can be one)."""
    from examples.prepare_shapes import to_coco

    root = Path(shapes["image"][0]).parent
    to_coco(shapes[:48], root / "resume-train.json")
    to_coco(shapes[48:64], root / "resume-validation.json")
    return {"train": str(root / "resume-train.json"), "validation": str(root / "resume-validation.json")}


def manifest(family: str, store: Path, tiny_bert: str, review_tables: dict, digit_tables: dict,
             shape_files: dict) -> dict:
    timm = {"checkpoint": "test_resnet", "imageSize": 32}  # trains with AutoMM's default trivial_augment
    hp = {**WORKERS, "optim.max_epochs": 2, "env.per_gpu_batch_size": 8, "env.batch_size": 8}
    if family == "hf_text":
        return training_run("text", str(store), review_tables, tiny_bert, hyperparameters=WORKERS)
    run = training_run(family.replace("_", "-"), str(store), digit_tables, tiny_bert, hyperparameters=hp)
    if family == "mmdet_image":  # training flips images (and boxes) half the time
        run = training_run("detection", str(store), shape_files, tiny_bert, hyperparameters=hp)
        run["spec"]["task"] = {"problemType": "object_detection"}
        run["spec"]["model"] = {"mmdetImage": {"checkpoint": "retinanet_r18_fpn_1x_coco", "imageSize": 64}}
        run["spec"]["hyperparameters"]["optim.max_epochs"] = 3  # 18 steps: room for two random stops
        run["spec"]["checkpoint"]["intervalSteps"] = 2
        return run
    if family == "timm_image":
        run["spec"]["model"] = {"timmImage": timm}
        run["spec"]["task"]["columnTypes"] = {"caption": "categorical"}
        run["spec"]["hyperparameters"]["model.names"] = ["timm_image"]
    else:  # text + image + numerical + categorical, fused
        run["spec"]["model"] = {"hfText": {"checkpoint": tiny_bert, "maxTextLen": 16}, "timmImage": timm}
        run["spec"]["task"]["columnTypes"] = {"caption": "text"}
    return run


@pytest.mark.parametrize("family", ["hf_text", "timm_image", "fusion", "mmdet_image"])
def test_sigterm_at_random_steps_with_augmentation_and_workers_ends_bit_identical(
        family, tmp_path, tiny_bert, review_tables, digit_tables, shape_files):
    if family == "mmdet_image":
        pytest.importorskip("mmdet", reason="the detection extra is not installed: run `make install`")
    run = manifest(family, tmp_path / "store", tiny_bert, review_tables, digit_tables, shape_files)
    name = run["metadata"]["name"]
    reference_dir = tmp_path / "reference" / "tests" / name
    (tmp_path / "reference").mkdir()
    reference = Trainer(tmp_path / "reference").attempt(run, str(reference_dir))
    assert reference.exit_code == 0, reference.output[-3000:]
    total = read_status(reference_dir)["finalState"]["step"]

    harness, run_dir = Trainer(tmp_path), tmp_path / "store" / "tests" / name
    seed = random.randrange(1 << 30)
    rng, stops = random.Random(seed), [0]
    for _ in range(2):
        # A SIGTERM goes out once a resume point at or past this step is recorded: seconds after it
        # is taken (its write), several steps on this small a run. The second stop can so land in
        # the last step, where the attempt stops after training instead (exit 75, no resume point).
        stop_after = max(stops[-1] + 1, min(stops[-1] + rng.randint(1, total // 4), total // 2))
        attempt = harness.attempt(run, str(run_dir), preempt_after_step=stop_after)
        assert attempt.exit_code == PREEMPTED_EXIT_CODE, f"seed {seed}:\n{attempt.output[-3000:]}"
        if "lastCheckpoint" not in read_status(run_dir):
            assert len(stops) > 1 and "stopped after training" in attempt.output, f"seed {seed}:\n{attempt.output[-3000:]}"
            break
        stops.append(read_status(run_dir)["lastCheckpoint"]["step"])
        assert stops[-1] < total, f"seed {seed}: the run finished before it could be preempted"
    finish(harness, run, run_dir)
    status = assert_same_outcome(run_dir, reference_dir)
    outcomes = ["preempted"] * (len(stops) - 1) + ["completed"]
    assert [a["outcome"] for a in status["attempts"]] == outcomes, f"seed {seed}, stopped at {stops[1:]}"
