"""Exact resume: runs SIGTERMed at random steps end bit-identical to an uninterrupted run."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch

from kontinue.trainer.callbacks import PREEMPTED_EXIT_CODE
from tests.trainer_fixtures import Trainer, training_run


def read_status(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def best_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(run_dir) / "model.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert, review_tables) -> tuple[dict, Path]:
    """The same run, never interrupted."""
    workdir = tmp_path_factory.mktemp("reference")
    manifest = training_run("exact", str(workdir / "store"), review_tables, tiny_bert)
    run_dir = workdir / "store" / "tests" / "exact"
    attempt = Trainer(workdir).attempt(manifest, str(run_dir))
    assert attempt.exit_code == 0, attempt.output[-3000:]
    return manifest, run_dir


def assert_same_outcome(run_dir: Path, reference_dir: Path) -> dict:
    status, expected = read_status(run_dir), read_status(reference_dir)
    assert status["phase"] == "Succeeded"
    assert status["finalState"] == expected["finalState"], "weights or optimizer state differ"
    assert status["metrics"] == expected["metrics"]
    assert status["bestCheckpoint"]["step"] == expected["bestCheckpoint"]["step"]
    ours, theirs = best_weights(run_dir), best_weights(reference_dir)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    return status


def stop(harness: Trainer, manifest: dict, run_dir: Path, **preempt) -> None:
    """An attempt SIGTERMed as `Trainer.attempt`'s options say, which must stop at a resume point."""
    attempt = harness.attempt(manifest, str(run_dir), **preempt)
    assert attempt.exit_code == PREEMPTED_EXIT_CODE, attempt.output[-3000:]


def finish(harness: Trainer, manifest: dict, run_dir: Path) -> str:
    """The next attempt, which must end the run; returns its output."""
    final = harness.attempt(manifest, str(run_dir))
    assert final.exit_code == 0, final.output[-3000:]
    return final.output


def test_preempted_three_times_ends_bit_identical_and_recomputes_nothing(reference, tmp_path):
    manifest, reference_dir = reference
    total = read_status(reference_dir)["finalState"]["step"]
    harness = Trainer(tmp_path)
    run_dir = tmp_path / "store" / "tests" / "exact"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    stopped_at = 0
    for _ in range(3):
        # Targets within the first two thirds: a stop lands a step or two after its target.
        stop_after = max(stopped_at + 1, min(stopped_at + rng.randint(1, 6), 2 * total // 3))
        attempt = harness.attempt(manifest, str(run_dir), preempt_after_step=stop_after)
        assert attempt.exit_code == PREEMPTED_EXIT_CODE, f"seed {seed}:\n{attempt.output[-3000:]}"
        stopped_at = read_status(run_dir)["lastCheckpoint"]["step"]
        assert stopped_at < total, f"seed {seed}: the run finished before it could be preempted"
    finish(harness, manifest, run_dir)

    status = assert_same_outcome(run_dir, reference_dir)
    attempts = status["attempts"]
    assert [a["outcome"] for a in attempts] == ["preempted"] * 3 + ["completed"]
    assert attempts[0]["fromStep"] == 0 and attempts[-1]["toStep"] == total
    for before, after in zip(attempts, attempts[1:]):
        assert after["fromStep"] == before["toStep"], f"seed {seed}: steps recomputed or skipped: {attempts}"
    assert not (run_dir / "last.json").exists() and not list((run_dir / "checkpoints").iterdir()), \
        "a finished run keeps model.ckpt only"


def test_preempted_before_the_first_step_resumes_from_the_starting_weights(reference, tmp_path):
    manifest, reference_dir = reference
    harness = Trainer(tmp_path)
    run_dir = tmp_path / "store" / "tests" / "exact"
    stop(harness, manifest, run_dir, preempt_after_step=0)
    finish(harness, manifest, run_dir)
    status = assert_same_outcome(run_dir, reference_dir)
    assert status["attempts"][1]["fromStep"] == status["attempts"][0]["toStep"]


def test_preempted_during_set_up_exits_as_preempted_and_resumes_exactly(reference, tmp_path):
    """SIGTERM while the trainer still imports and loads: kept, then a clean stop at step 0."""
    manifest, reference_dir = reference
    harness = Trainer(tmp_path)
    run_dir = tmp_path / "store" / "tests" / "exact"
    stop(harness, manifest, run_dir, preempt_after_seconds=1.5)
    assert read_status(run_dir)["lastCheckpoint"]["step"] == 0
    finish(harness, manifest, run_dir)
    assert_same_outcome(run_dir, reference_dir)


def with_slow_validation(manifest: dict, tmp_path: Path, reviews, checkpoint_every: int) -> dict:
    """The manifest with 3,000 validation rows (a validation long enough to be stopped in) and a
    resume point every `checkpoint_every` steps."""
    manifest = copy.deepcopy(manifest)
    slow_validation = tmp_path / "validation.parquet"
    reviews[400:3400].to_parquet(slow_validation)
    manifest["spec"]["data"]["validation"] = str(slow_validation)
    manifest["spec"]["checkpoint"]["intervalSteps"] = checkpoint_every
    return manifest


def stop_during_a_slow_validation(reference, tmp_path, reviews, checkpoint_every: int) -> int:
    """SIGTERM after the resume point at `checkpoint_every`, while a slow validation (3,000 rows)
    runs; resumes to the end, checks the trained state is the reference's (validation does not
    touch the weights) and returns the step the stop was saved at."""
    manifest, reference_dir = reference
    manifest = with_slow_validation(manifest, tmp_path, reviews, checkpoint_every)
    harness = Trainer(tmp_path)
    run_dir = tmp_path / "store" / "tests" / "exact"
    stop(harness, manifest, run_dir, preempt_after_step=checkpoint_every)
    stopped_at = read_status(run_dir)["lastCheckpoint"]["step"]
    finish(harness, manifest, run_dir)
    assert read_status(run_dir)["finalState"] == read_status(reference_dir)["finalState"]
    return stopped_at


def test_a_stop_during_a_validation_inside_an_accumulated_step_waits_for_the_step(reference, tmp_path, reviews):
    """Here a validation falls between the two batches of one accumulated step (after batch 15 of
    30, two batches a step). Gradients are not in a checkpoint, so a resume point taken there would
    lose half a step: the stop must wait for step 8."""
    assert stop_during_a_slow_validation(reference, tmp_path, reviews, checkpoint_every=7) == 8


def test_a_stop_at_the_end_of_an_epoch_resumes_into_the_next_one(reference, tmp_path, reviews):
    """A resume point taken at an epoch's last validation made the resumed fit end there (half its
    training missing); the stop now lands on the first step of the next epoch (step 16 of 30)."""
    assert stop_during_a_slow_validation(reference, tmp_path, reviews, checkpoint_every=14) == 16


def test_a_stop_in_the_last_step_stops_the_attempt_once_training_is_done(reference, tmp_path, reviews):
    """SIGTERM after the last resume point (step 29 of 30), in the last step or the validation
    after it: too late for a resume point (none is taken at an epoch's end), so the attempt stops
    once training is done, before the dump, and the next attempt finishes without training again.
    Such a stop was lost: the attempt went on to the end, past a pod's grace period on a big dump."""
    manifest, reference_dir = reference
    manifest = with_slow_validation(manifest, tmp_path, reviews, checkpoint_every=29)
    harness = Trainer(tmp_path)
    run_dir = tmp_path / "store" / "tests" / "exact"
    attempt = harness.attempt(manifest, str(run_dir), preempt_after_step=29)
    assert attempt.exit_code == PREEMPTED_EXIT_CODE, attempt.output[-3000:]
    assert "stopped after training" in attempt.output
    trained = read_status(run_dir)["attempts"][0]
    assert (trained["toStep"], trained["outcome"]) == (30, "completed")
    assert "is trained; finishing what is left" in finish(harness, manifest, run_dir)
    status = read_status(run_dir)
    assert status["finalState"] == read_status(reference_dir)["finalState"]
    assert len(status["attempts"]) == 1, "trained again"
    assert status["dumpedModel"]


def test_truncated_newest_checkpoint_resumes_from_the_previous_one(reference, tmp_path):
    manifest, reference_dir = reference
    harness = Trainer(tmp_path)
    run_dir = tmp_path / "store" / "tests" / "exact"
    stop(harness, manifest, run_dir, preempt_after_step=9)
    newest, previous = json.loads((run_dir / "last.json").read_text())["points"]
    assert newest["step"] > previous["step"]
    assert torch.load(run_dir / previous["key"], weights_only=True)["global_step"] == previous["step"]
    damaged = run_dir / newest["key"]
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])

    assert f"skipping checkpoint {newest['key']}" in finish(harness, manifest, run_dir)
    status = assert_same_outcome(run_dir, reference_dir)
    assert any(newest["key"] in warning["message"] for warning in status["warnings"])
    assert status["attempts"][1]["fromStep"] == previous["step"] < status["attempts"][0]["toStep"]


def test_s3_run_directory_resumes_on_a_new_machine(reference, tmp_path, s3_server, review_tables):
    """Checkpoints and data in S3; each attempt starts from an empty scratch directory."""
    _, reference_dir = reference
    bucket = s3_server.make_bucket("runs")
    store = s3_server.client()
    store.fput_object(bucket, "data/train.parquet", review_tables["train"])
    manifest, _ = reference
    manifest = json.loads(json.dumps(manifest))
    manifest["spec"]["data"]["train"] = f"s3://{bucket}/data/train.parquet"
    manifest["spec"]["checkpoint"] = {"storage": f"s3://{bucket}/store", "intervalSteps": 3,
                                      "secretRef": {"name": "s3-credentials"}}
    run_uri = f"s3://{bucket}/store/tests/exact"
    first = Trainer(tmp_path / "node-1", s3_server.environ)
    (tmp_path / "node-1").mkdir()
    attempt = first.attempt(manifest, run_uri, preempt_after_step=5,
                            status_file=tmp_path / "node-1" / "scratch" / "run" / "status.json")
    assert attempt.exit_code == PREEMPTED_EXIT_CODE, attempt.output[-3000:]
    pointer = json.loads(store.get_object(bucket, "store/tests/exact/last.json").read())
    newest = pointer["points"][0]
    assert store.stat_object(bucket, f"store/tests/exact/{newest['key']}.sha256")
    assert json.loads(store.get_object(bucket, "store/tests/exact/status.json").read())["lastCheckpoint"] == {
        "uri": f"{run_uri}/{newest['key']}", **{k: newest[k] for k in ("step", "epoch", "sha256", "time")}}

    (tmp_path / "node-2").mkdir()
    final = Trainer(tmp_path / "node-2", s3_server.environ).attempt(manifest, run_uri)
    assert final.exit_code == 0, final.output[-3000:]
    status = json.loads(store.get_object(bucket, "store/tests/exact/status.json").read())
    assert status["finalState"] == read_status(reference_dir)["finalState"]
    assert status["attempts"][1]["fromStep"] == status["attempts"][0]["toStep"]
    names = {o.object_name for o in store.list_objects(bucket, "store/tests/exact/", recursive=True)}
    assert {"store/tests/exact/model.ckpt", "store/tests/exact/dump/hf_text/model.safetensors"} <= names
    assert not {name for name in names if "checkpoints/" in name or name.endswith("last.json")}, \
        "a finished run keeps model.ckpt only"
    assert s3_server.secret_key not in attempt.output + final.output
