"""The resume-point protocol: immutable checkpoints, one pointer, a background writer.

A crash is injected at every step of a save (the process dies there: nothing after it runs), and a
new RunDirectory, as the next attempt would open it, must resume from a complete, verified point.
Then the real trainer: SIGKILLs and SIGTERMs while saves are in flight, an old-layout directory,
and stops after training.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from kontinue.trainer.callbacks import validation_follows
from kontinue.trainer.checkpoint_io import BackgroundWriter
from kontinue.trainer.ownership import Claimant
from kontinue.trainer.rundir import EMPTY, POINTER, RESUMABLE, RunDirectory, open_run_directory
from kontinue.trainer.serializer import MIN_HELPER_BYTES_ENV
from tests.test_resume import assert_same_outcome, finish, read_status, reference, stop  # noqa: F401
from kontinue.api.contract import PREEMPTED_EXIT_CODE
from tests.kube_fixtures import wait_for
from tests.trainer_fixtures import Trainer, has_no_resume_points, resume_points, signal_when, training_run

HELPER_READY = "serialised by helper process"  # what the trainer logs once its helper takes writes


class Crash(Exception):
    """The process died here."""


def checkpoint(step: int) -> dict:
    torch.manual_seed(step)
    return {"global_step": step, "epoch": step // 10, "state_dict": {"w": torch.randn(64, 64)}}


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "run")
    s3_server = request.getfixturevalue("s3_server")
    for name, value in s3_server.environ.items():  # what the trainer pod gets from its Secret
        monkeypatch.setenv(name, value)
    return f"s3://{s3_server.make_bucket()}/runs/exact"


def reopen(run_uri: str, tmp_path: Path) -> RunDirectory:
    """The run directory as the next attempt opens it, on a new machine (an empty scratch directory)."""
    return open_run_directory(run_uri, tmp_path / f"scratch-{time.monotonic_ns()}")


def resumes_at(run_uri: str, tmp_path: Path) -> int:
    path = reopen(run_uri, tmp_path).find_resume_point()
    return torch.load(path, weights_only=True)["global_step"]


def write(run_dir: RunDirectory, step: int) -> dict:
    return run_dir.write_resume_point(checkpoint(step), run_dir.resume_point_key(step))


def crash_at(monkeypatch, store, method: str, *, when=lambda *args: True, after: int = 0) -> None:
    """`store.method` raises Crash on its (after+1)-th call for which `when(*args)` holds."""
    original, calls = getattr(store, method), []

    def crashing(*args, **kwargs):
        if when(*args):
            calls.append(args)
            if len(calls) > after:
                raise Crash(f"{method}{args}")
        return original(*args, **kwargs)

    monkeypatch.setattr(store, method, crashing)


def stored_points(run_uri: str, tmp_path: Path) -> list[str]:
    return [info.key for info in reopen(run_uri, tmp_path).store.list("checkpoints/") if info.key.endswith(".ckpt")]


def test_the_pointer_names_the_newest_two_and_older_points_are_deleted_once_it_moved(run_uri, tmp_path):
    run_dir = reopen(run_uri, tmp_path)
    for step in (0, 3, 6, 9):
        write(run_dir, step)
    points = json.loads(run_dir.store.read_text(POINTER))["points"]
    assert [p["step"] for p in points] == [9, 6]
    assert stored_points(run_uri, tmp_path) == [p["key"] for p in reversed(points)]
    assert run_dir.status["lastCheckpoint"]["step"] == 9
    assert run_dir.status["lastCheckpoint"]["sha256"] == points[0]["sha256"] == run_dir.store.sha256_of(points[0]["key"])
    run_dir.keep = 3
    write(run_dir, 12)
    assert [p["step"] for p in json.loads(run_dir.store.read_text(POINTER))["points"]] == [12, 9, 6]
    assert resumes_at(run_uri, tmp_path) == 12


def test_a_model_candidate_lives_as_long_as_a_kept_resume_point_needs_it(run_uri, tmp_path):
    """optim.top_k: candidates are written before the resume points that name them, and deleted only
    once no point last.json keeps names them; a finished run keeps none."""
    run_dir = reopen(run_uri, tmp_path)

    def candidate(step: int) -> dict:
        key = run_dir.candidate_key(step)
        run_dir.write_candidate(key, {"state_dict": checkpoint(step)["state_dict"], "score": 0.5, "step": step})
        return {"key": key, "step": step, "score": 0.5}

    def point(step: int, *kept: dict) -> None:
        run_dir.write_resume_point({**checkpoint(step), "candidates": list(kept)}, run_dir.resume_point_key(step))

    def stored() -> list[int]:
        return [int(info.key.split("-")[1].split(".")[0])
                for info in reopen(run_uri, tmp_path).store.list("candidates/")]

    one, two = candidate(1), candidate(2)
    point(3, two, one)
    three = candidate(4)  # one drops out of the top 2 here; points 3 and 5 are kept
    point(5, three, two)
    assert stored() == [1, 2, 4]  # point 3 still needs one
    point(6, three, two)
    assert stored() == [2, 4]
    assert json.loads(run_dir.store.read_text(POINTER))["points"][0]["candidates"] == [three["key"], two["key"]]
    restored = torch.load(reopen(run_uri, tmp_path).fetch_candidate(two["key"]), weights_only=True)
    assert torch.equal(restored["state_dict"]["w"], checkpoint(2)["state_dict"]["w"])
    run_dir.drop_resume_points()
    assert stored() == []


def test_a_stale_attempt_stopped_inside_its_cleanup_never_deletes_a_newer_attempts_points(run_uri, tmp_path):
    """Attempt 1 checked its claim, then froze (SIGSTOP, a partition) before deleting old points;
    attempt 2 took over and saved. When attempt 1 goes on, its deletions spare attempt 2's objects."""
    def attempt(n: int) -> RunDirectory:
        run_dir = reopen(run_uri, tmp_path)
        run_dir.claim(Claimant(uid="uid-a", digest="d", attempt=n))
        return run_dir

    first = attempt(1)
    write(first, 3)
    second = attempt(2)
    second.find_resume_point()
    for step in (6, 9):
        write(second, step)
    with pytest.MonkeyPatch.context() as frozen:
        frozen.setattr(first.ownership, "check", lambda: None)  # the claim was checked before the freeze
        first._delete_resume_points(keep=set())  # whatever it may delete
    named = json.loads(second.store.read_text(POINTER))["points"]
    assert [p["step"] for p in named] == [9, 6] and set(stored_points(run_uri, tmp_path)) == {p["key"] for p in named}
    assert resumes_at(run_uri, tmp_path) == 9


@pytest.mark.parametrize("where", ["while streaming the object", "after the object, before the pointer",
                                   "after the pointer, before the status", "while deleting old points"])
def test_a_crash_at_every_step_of_a_save_resumes_from_a_valid_point(run_uri, tmp_path, where):
    run_dir = reopen(run_uri, tmp_path)
    write(run_dir, 3)
    write(run_dir, 6)
    store = run_dir.store
    with pytest.MonkeyPatch.context() as crash:
        if where == "while streaming the object":
            crash.setattr(torch, "save", lambda obj, f: (f.write(b"PK\x03\x04 half a checkpoint"), _raise()))
        elif where == "after the object, before the pointer":
            crash_at(crash, store, "write_text", when=lambda key, text: key == POINTER)
        elif where == "after the pointer, before the status":
            crash.setattr(run_dir, "update_status", lambda **fields: _raise())
        else:
            crash_at(crash, store, "delete", after=0)
        with pytest.raises(Crash):
            write(run_dir, 9)

    expected = 9 if where in ("after the pointer, before the status", "while deleting old points") else 6
    assert resumes_at(run_uri, tmp_path) == expected
    # The next attempt's first save tidies up: whatever the crash left unnamed is deleted.
    next_attempt = reopen(run_uri, tmp_path)
    next_attempt.find_resume_point()
    write(next_attempt, expected + 1)
    points = json.loads(next_attempt.store.read_text(POINTER))["points"]
    assert [p["step"] for p in points] == [expected + 1, expected]
    assert stored_points(run_uri, tmp_path) == [p["key"] for p in reversed(points)]
    assert not any(info.key.startswith("checkpoints/.") for info in next_attempt.store.list())


def _raise():
    raise Crash("the process died here")


def test_a_damaged_or_missing_newest_point_falls_back_to_its_predecessor_with_a_warning(run_uri, tmp_path):
    run_dir = reopen(run_uri, tmp_path)
    for step in (3, 6):
        write(run_dir, step)
    newest = json.loads(run_dir.store.read_text(POINTER))["points"][0]
    run_dir.store.put_bytes(newest["key"], b"not the checkpoint the pointer names")  # sidecar gone too
    resumed = reopen(run_uri, tmp_path)
    assert torch.load(resumed.find_resume_point(), weights_only=True)["global_step"] == 3
    assert any(newest["key"] in w["message"] and "sha256" in w["message"] for w in resumed.status["warnings"])
    run_dir.store.delete(newest["key"])
    resumed = reopen(run_uri, tmp_path)
    assert torch.load(resumed.find_resume_point(), weights_only=True)["global_step"] == 3
    assert any("names it but it is gone" in w["message"] for w in resumed.status["warnings"])


def test_an_unreadable_pointer_falls_back_to_the_points_found_by_listing(run_uri, tmp_path):
    run_dir = reopen(run_uri, tmp_path)
    for step in (3, 6):
        write(run_dir, step)
    run_dir.store.write_text(POINTER, "{not json")
    resumed = reopen(run_uri, tmp_path)
    assert torch.load(resumed.find_resume_point(), weights_only=True)["global_step"] == 6
    assert any(POINTER in w["message"] for w in resumed.status["warnings"])


def test_a_scratch_directory_left_by_another_run_is_not_taken_for_this_one(s3_server, tmp_path, monkeypatch):
    """A remote run directory opened on a scratch directory that still mirrors another run (a reused
    volume, a second run on the same disk): the remote directory is the truth, so a new run starts
    empty instead of failing to resume the other one."""
    for name, value in s3_server.environ.items():
        monkeypatch.setenv(name, value)
    bucket, scratch = s3_server.make_bucket(), tmp_path / "scratch"
    other = open_run_directory(f"s3://{bucket}/runs/other", scratch)
    other.write_metadata({"label": "label"})
    other.update_status(phase="Running", step=5, lastCheckpoint={"step": 5, "uri": f"s3://{bucket}/runs/other/x"})
    assert other.state() == RESUMABLE

    mine = open_run_directory(f"s3://{bucket}/runs/mine", scratch)
    assert mine.state() == EMPTY
    assert mine.status == {} and not any(path.is_file() for path in scratch.rglob("*"))
    again = open_run_directory(f"s3://{bucket}/runs/other", scratch)  # and the other one is whole again
    assert again.state() == RESUMABLE and again.status["step"] == 5


def test_a_stale_attempt_never_reuses_a_newer_attempts_key(tmp_path):
    """Keys carry the attempt: an older attempt that finishes an upload after a newer one took
    over writes an object nobody names, never over one the pointer names."""
    from kontinue.trainer.ownership import Claimant

    run_dir = RunDirectory(tmp_path / "run")
    run_dir.claim(Claimant(uid="u", digest="d", attempt=3))
    assert run_dir.resume_point_key(120) == "checkpoints/step-000000120-a3.ckpt"
    assert run_dir.resume_point_key(120) == "checkpoints/step-000000120-a3-1.ckpt"


def test_the_background_writer_keeps_order_supersedes_waiting_points_and_reports_failures():
    written, started, release = [], threading.Event(), threading.Event()
    writer = BackgroundWriter()
    writer.submit(lambda: (started.set(), release.wait(5), written.append("point 1")), "point 1", supersedable=True)
    started.wait(5)  # being written: no longer waiting, so never dropped
    writer.submit(lambda: written.append("best model"), "best model")
    writer.submit(lambda: written.append("point 2"), "point 2", supersedable=True)
    writer.submit(lambda: written.append("point 3"), "point 3", supersedable=True)  # point 2 never written
    release.set()
    writer.flush()
    assert written == ["point 1", "best model", "point 3"]
    writer.submit(lambda: _raise(), "best model 2")
    writer.submit(lambda: written.append("point 5"), "point 5", supersedable=True)
    with pytest.raises(Crash):
        writer.flush()
    with pytest.raises(Crash):
        writer.submit(lambda: written.append("point 6"), "point 6")
    assert written[-1] == "point 3", "nothing is written after a failure"


# -- the real trainer --------------------------------------------------------------------------------

def every_step(manifest: dict) -> dict:
    """The same run with a resume point after every step: saves are nearly always in flight."""
    manifest = copy.deepcopy(manifest)
    manifest["spec"]["checkpoint"]["intervalSteps"] = 1
    return manifest


def test_sigkill_at_random_moments_while_saves_are_in_flight_ends_bit_identical(reference, tmp_path):  # noqa: F811
    manifest, reference_dir = reference
    manifest = every_step(manifest)
    total = read_status(reference_dir)["finalState"]["step"]
    harness, run_dir = Trainer(tmp_path), tmp_path / "store" / "tests" / "exact"
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(3):
        done = read_status(run_dir).get("lastCheckpoint", {}).get("step", -1) if run_dir.exists() else -1
        target = min(total - 2, done + rng.randint(2, 6))
        process = harness.start(manifest, str(run_dir))
        signal_when(process.popen, lambda: _newest_step(run_dir) >= target and not time.sleep(rng.uniform(0, 0.2)),
                    signal.SIGKILL, time.monotonic() + 300)
        assert process.popen.returncode == -signal.SIGKILL, f"seed {seed}: {process.output()[-3000:]}"
    finish(harness, manifest, run_dir)
    status = assert_same_outcome(run_dir, reference_dir)
    assert has_no_resume_points(run_dir)
    assert status["attempts"][-1]["outcome"] == "completed"


def _newest_step(run_dir: Path) -> int:
    try:
        return resume_points(run_dir)[0]["step"]
    except (OSError, ValueError, IndexError, KeyError):
        return -1


def _await(condition, process, what: str) -> None:
    wait_for(condition, 120, what, interval=0.02, dump=lambda: process.output()[-3000:])


def _helper_of(process) -> int | None:
    """The pid of the trainer's checkpoint serializer process, once it exists."""
    trainer = process.popen.pid
    for task in Path(f"/proc/{trainer}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:  # a thread that has ended
            continue
        for child in children:
            try:
                if b"kontinue.trainer.serializer" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
            except OSError:  # a child that has ended
                continue
    return None


def test_sigterm_with_a_save_in_flight_cancels_it_and_resumes_exactly(long_reference, tmp_path):
    """Every checkpoint through the helper process, a resume point each step, and the helper held
    (SIGSTOP) while newer points queue: in the first attempt before it is ready (the first point
    waits for it), in the others as it takes its first write. Then SIGTERM: the point being written
    or waited for is cancelled (the helper, continued, stops before the object is stored), the
    waiting ones are dropped, the final point is written by the trainer's thread, and every stop
    is durable, recorded and exact."""
    manifest, reference_dir = long_reference
    manifest = every_step(manifest)
    harness, run_dir = Trainer(tmp_path, {MIN_HELPER_BYTES_ENV: "0"}), tmp_path / "store" / "tests" / "exact"
    cancelled = []
    for attempt in range(3):
        process = harness.start(manifest, str(run_dir))
        _await(lambda: _helper_of(process), process, "helper process")
        if attempt:
            _await(lambda: HELPER_READY in process.output(), process, "ready helper")
        helper = _helper_of(process)
        os.kill(helper, signal.SIGSTOP)
        try:
            queued = process.output().count("superseded by")
            _await(lambda: process.output().count("superseded by") > queued, process, "resume point waiting")
            before_stop = len(process.output())
            process.popen.send_signal(signal.SIGTERM)
            _await(lambda: "waiting for" in process.output()[before_stop:], process, "stop")
        finally:
            os.kill(helper, signal.SIGCONT)
        assert process.popen.wait(timeout=120) == PREEMPTED_EXIT_CODE, process.output()[-3000:]
        cancelled.append("is cancelled: the final resume point supersedes it" in process.output()[before_stop:])
        status = read_status(run_dir)
        assert status["lastCheckpoint"]["step"] == resume_points(run_dir)[0]["step"] == status["attempts"][-1]["toStep"]
        assert not list(run_dir.glob("checkpoints/.*.tmp")), "a cancelled write left its temporary file"
    assert cancelled[0], "the resume point waiting for the helper was not cancelled"
    assert any(cancelled[1:]), "no stop found the helper writing a resume point (each a candidate): not tested"
    finish(harness, manifest, run_dir)
    assert_same_outcome(run_dir, reference_dir)
    assert has_no_resume_points(run_dir)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory, tiny_bert, review_tables) -> tuple[dict, Path]:
    """An uninterrupted run long enough (10 epochs) for the helper process of each attempt to start
    (it imports torch) well before the run ends."""
    workdir = tmp_path_factory.mktemp("long-reference")
    manifest = training_run("exact", str(workdir / "store"), review_tables, tiny_bert,
                            hyperparameters={"optim.max_epochs": 10})
    run_dir = workdir / "store" / "tests" / "exact"
    attempt = Trainer(workdir).attempt(manifest, str(run_dir))
    assert attempt.exit_code == 0, attempt.output[-3000:]
    return manifest, run_dir


def test_saves_by_the_helper_process_stopped_by_sigterm_and_sigkill_resume_exactly(long_reference, tmp_path):
    """Every checkpoint through the helper process, as a big model's go (the tiny model's are under
    MIN_HELPER_BYTES), a resume point each step: a SIGTERM and a SIGKILL while saves are in flight,
    each a few steps after that attempt's helper started, and the run still ends bit-identical to the
    uninterrupted one (whose checkpoints the trainer's writer thread wrote)."""
    manifest, reference_dir = long_reference
    manifest = every_step(manifest)
    total = read_status(reference_dir)["finalState"]["step"]
    harness, run_dir = Trainer(tmp_path, {MIN_HELPER_BYTES_ENV: "0"}), tmp_path / "store" / "tests" / "exact"
    rng = random.Random()
    for signum, exit_code in ((signal.SIGTERM, PREEMPTED_EXIT_CODE), (signal.SIGKILL, -signal.SIGKILL)):
        process, stop_at = harness.start(manifest, str(run_dir)), []

        def due() -> bool:
            if not stop_at and HELPER_READY in process.output():
                stop_at.append(_newest_step(run_dir) + rng.randint(2, 5))
            return bool(stop_at) and _newest_step(run_dir) >= stop_at[0]

        code = signal_when(process.popen, due, signum, time.monotonic() + 300)
        assert stop_at, f"the helper never said it was ready: {process.output()[-3000:]}"
        assert code == exit_code, process.output()[-3000:]
        assert _newest_step(run_dir) < total
        if signum == signal.SIGTERM:  # its final resume point is durable and recorded
            status = read_status(run_dir)
            assert status["lastCheckpoint"]["step"] == resume_points(run_dir)[0]["step"] == \
                status["attempts"][-1]["toStep"]
    finish(harness, manifest, run_dir)
    assert_same_outcome(run_dir, reference_dir)
    assert has_no_resume_points(run_dir)


def test_an_old_layout_run_directory_still_resumes_and_ends_in_the_new_one(reference, tmp_path):  # noqa: F811
    """A run preempted by a trainer from before last.json: last.ckpt and previous.ckpt with their sidecars."""
    manifest, reference_dir = reference
    harness, run_dir = Trainer(tmp_path), tmp_path / "store" / "tests" / "exact"
    stop(harness, manifest, run_dir, preempt_after_step=5)
    newest, predecessor = resume_points(run_dir)
    for point, name in ((newest, "last.ckpt"), (predecessor, "previous.ckpt")):
        (run_dir / point["key"]).rename(run_dir / name)
        (run_dir / f"{point['key']}.sha256").rename(run_dir / f"{name}.sha256")
    (run_dir / "last.json").unlink()
    shutil.rmtree(run_dir / "checkpoints")
    status = read_status(run_dir)
    status["lastCheckpoint"]["uri"] = (run_dir / "last.ckpt").as_uri()
    (run_dir / "status.json").write_text(json.dumps(status))

    finish(harness, manifest, run_dir)
    status = assert_same_outcome(run_dir, reference_dir)
    assert status["attempts"][1]["fromStep"] == newest["step"]
    assert has_no_resume_points(run_dir)


@pytest.fixture(scope="module")
def big_test_set(tmp_path_factory, reviews) -> str:
    """5,000 test rows: scoring them takes long enough to be stopped in."""
    path = tmp_path_factory.mktemp("big-test") / "test.parquet"
    reviews[400:5400].to_parquet(path)
    return str(path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_stopped_after_training_the_next_attempt_finishes_without_training_again(
        reference, tmp_path, big_test_set, signum):  # noqa: F811
    """SIGTERM or SIGKILL once training is recorded (finalState), while the resume points are
    deleted, the test data scored and the model dumped: never a Failed run or a half dump."""
    manifest, reference_dir = reference
    manifest = copy.deepcopy(manifest)
    manifest["spec"]["data"]["test"] = big_test_set
    harness, run_dir = Trainer(tmp_path), tmp_path / "store" / "tests" / "exact"
    process = harness.start(manifest, str(run_dir))
    code = signal_when(process.popen, lambda: "finalState" in _status(run_dir), signum, time.monotonic() + 300)
    output = process.output()
    if signum == signal.SIGTERM:
        assert code == PREEMPTED_EXIT_CODE, output[-3000:]
        assert "stopped after training" in output
    else:
        assert code == -signal.SIGKILL
    assert not (run_dir / "dump").exists() or (run_dir / "dump" / "hf_text" / "model.safetensors").exists()

    final = finish(harness, manifest, run_dir)
    assert "is trained; finishing what is left" in final
    status = assert_same_outcome(run_dir, reference_dir)
    assert len(status["attempts"]) == 1, "trained again"
    assert has_no_resume_points(run_dir)
    assert set(status["testMetrics"]) >= {"accuracy"} and status["dumpedModel"]
    from kontinue.trainer.predictor import Predictor

    trained = Predictor.load(run_dir)
    import pandas as pd

    assert trained.evaluate(pd.read_parquet(big_test_set))["accuracy"] == status["testMetrics"]["accuracy"]
    assert (run_dir / "dump" / "hf_text" / "model.safetensors").exists()


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("v", self.layer(batch[0]).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _Recorder(pl.Callback):
    """Per training batch: what validation_follows predicted, and whether Lightning then validated."""

    def __init__(self):
        self.predicted, self.validated = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.predicted.append(validation_follows(trainer, batch_idx))
        self.validated.append(False)

    def on_validation_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated[-1] = True


@pytest.mark.parametrize("interval, every_n_epochs, accumulate", [
    (0.5, 1, 1), (0.5, 1, 3), (1.0, 2, 1), (4, 1, 2), (0.3, 3, 1)])
def test_the_public_validation_rule_agrees_with_where_lightning_validates(tmp_path, interval, every_n_epochs,
                                                                         accumulate):
    """ResumePoints waits for a validation that follows a step; its rule is read from the Trainer's
    public attributes and must agree with Lightning's loop (11 batches: odd, so fractions round)."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(44, 4)), batch_size=4)
    recorder = _Recorder()
    trainer = pl.Trainer(max_epochs=4, val_check_interval=interval, check_val_every_n_epoch=every_n_epochs,
                         accumulate_grad_batches=accumulate, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[recorder], default_root_dir=tmp_path)
    trainer.fit(_Tiny(), data, data)
    assert any(recorder.validated) and recorder.predicted == recorder.validated


def test_a_resume_point_due_on_an_epochs_last_step_moves_to_the_next_and_resumes_exactly(reference, tmp_path):  # noqa: F811
    """Lightning ends a fit resumed from a checkpoint taken on an epoch's last batch at once, so a
    point due there is taken one step later. Without accumulation 15 batches make an epoch and the
    two validations follow batches 7 and 14, not the last (as in DDP at world size 2)."""
    manifest, _ = reference
    manifest = copy.deepcopy(manifest)
    manifest["spec"]["hyperparameters"]["env.per_gpu_batch_size"] = 16
    harness = Trainer(tmp_path)
    reference_dir = tmp_path / "reference" / "tests" / "exact"
    manifest["spec"]["checkpoint"]["storage"] = str(tmp_path / "reference")
    assert harness.attempt(manifest, str(reference_dir)).exit_code == 0
    epoch_steps = read_status(reference_dir)["finalState"]["step"] // manifest["spec"]["hyperparameters"]["optim.max_epochs"]
    manifest["spec"]["checkpoint"] = {"storage": str(tmp_path / "store"), "intervalSteps": epoch_steps}
    run_dir = tmp_path / "store" / "tests" / "exact"
    process = harness.start(manifest, str(run_dir))
    signal_when(process.popen, lambda: _newest_step(run_dir) >= epoch_steps, signal.SIGKILL, time.monotonic() + 300)
    assert process.popen.returncode == -signal.SIGKILL, process.output()[-3000:]
    assert resume_points(run_dir)[0]["step"] == epoch_steps + 1
    finish(harness, manifest, run_dir)
    status = assert_same_outcome(run_dir, reference_dir)
    assert [a["fromStep"] for a in status["attempts"]] == [0, epoch_steps + 1]
