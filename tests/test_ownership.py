"""Run identity and fencing (kontinue.trainer.ownership): a re-created run never resumes another
spec's model, and a stale attempt never overwrites what a newer one wrote. The rules as a pure
function, the record on local and S3 stores, then real `kontinue train` processes."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kontinue.api.contract import (ATTEMPT_ENV, INVALID_SPEC_EXIT_CODE, PREEMPTED_EXIT_CODE, RUN_UID_ENV,
                                   SUPERSEDED_EXIT_CODE, InvalidInput)
from kontinue.trainer.ownership import (CLAIM, KEEP, OWNER, REFUSE, SUPERSEDED, Claimant, Ownership, Superseded,
                                        decide)
from tests.test_resume import reference  # noqa: F401 -- the uninterrupted run, as a fixture
from tests.trainer_fixtures import Trainer

UID_A, UID_B = "0f6c0a52-aaaa", "7d1e94b3-bbbb"
ME = Claimant(uid=UID_B, digest="digest-1", attempt=2, run="TrainingRun tests/exact")


def held(uid=UID_B, digest="digest-1", attempt=1) -> dict:
    return {"uid": uid, "run": "TrainingRun tests/exact", "specDigest": digest, "attempt": attempt,
            "time": "2024-05-01T10:00:00+00:00"}


# -- the rules -------------------------------------------------------------------------------------
@pytest.mark.parametrize("record, claimable, action", [
    (None, True, CLAIM),                               # a new directory
    (None, False, CLAIM),                              # written before owners existed
    (held(uid=UID_A, digest="other"), True, CLAIM),    # another spec's, but nothing trained yet
    (held(uid=UID_A, digest="other"), False, REFUSE),  # another spec's model: never resumed
    (held(uid=UID_B, digest="other"), False, REFUSE),  # this run's, but its spec changed
    (held(uid=UID_A, attempt=5), False, CLAIM),        # re-created run, same spec: continues it
    (held(attempt=1), False, CLAIM),                   # the next attempt
    (held(attempt=2), False, KEEP),                    # this attempt (another DDP rank claimed it)
    (held(attempt=3), False, SUPERSEDED),              # a newer attempt of this run
    (held(attempt=3), True, SUPERSEDED),               # ... also while it is still setting up
    (held(attempt=3, digest="other"), True, SUPERSEDED),
])
def test_decide(record, claimable, action):
    decision = decide(record, ME, claimable=claimable, where="file:///runs/tests/exact", time="now")
    assert decision.action == action
    if action == CLAIM:
        assert decision.record == {"uid": UID_B, "run": "TrainingRun tests/exact", "specDigest": "digest-1",
                                   "attempt": 2, "time": "now"}
    if action == SUPERSEDED:
        assert "attempt 3" in decision.message and "attempt 2" in decision.message


def test_decide_refusal_says_whose_directory_and_what_to_do():
    decision = decide(held(uid=UID_A, digest="f" * 64), ME, claimable=False, where="s3://runs/tests/exact")
    assert decision.action == REFUSE
    for words in ("s3://runs/tests/exact", UID_A, "TrainingRun tests/exact", "ffffffffffff", "Delete",
                  "spec.checkpoint.storage"):
        assert words in decision.message


def test_decide_by_hand_checks_the_spec_and_leaves_the_holder():
    by_hand = Claimant(uid=None, digest="digest-1")
    assert decide(held(uid=UID_A, attempt=4), by_hand, claimable=False, where="x").record == held(UID_A, attempt=4)
    assert decide(held(uid=UID_A, digest="other"), by_hand, claimable=False, where="x").action == REFUSE
    assert decide(None, by_hand, claimable=True, where="x").record["uid"] is None


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_claims_and_checks_on_a_store(kind, request):
    store = request.getfixturevalue(f"{kind}_store")
    first = Ownership(store, Claimant(uid=UID_A, digest="d", attempt=1))
    first.claim(claimable=True, time="t1")
    first.check()
    assert json.loads(store.read_text(OWNER))["attempt"] == 1

    second = Ownership(store, Claimant(uid=UID_A, digest="d", attempt=2))
    second.claim(claimable=False, time="t2")
    with pytest.raises(Superseded, match="attempt 2 of this run claimed") as stop:
        first.check()
    assert stop.value.code == SUPERSEDED_EXIT_CODE
    with pytest.raises(Superseded):  # once found, without reading again
        first.check()
    second.check()

    with pytest.raises(Superseded):  # a late start of the older attempt writes nothing
        Ownership(store, Claimant(uid=UID_A, digest="d", attempt=1)).claim(claimable=False, time="t3")
    with pytest.raises(InvalidInput) as refused:
        Ownership(store, Claimant(uid=UID_B, digest="e", attempt=1)).claim(claimable=False, time="t3")
    assert refused.value.field == "spec.checkpoint.storage"
    assert json.loads(store.read_text(OWNER)) == {"uid": UID_A, "run": "", "specDigest": "d", "attempt": 2,
                                                  "time": "t2"}


# -- real trainer processes --------------------------------------------------------------------------
def files(run_dir: Path) -> dict[str, str]:
    return {p.relative_to(run_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def pod(workdir: Path, uid: str, attempt: int, **environ: str) -> Trainer:
    """A trainer pod's environment, as build_trainer_pod sets it."""
    workdir.mkdir(parents=True, exist_ok=True)
    return Trainer(workdir, {RUN_UID_ENV: uid, ATTEMPT_ENV: str(attempt), **environ})


def between_writes(local_dir: Path, status, pointer, checkpoints) -> bool:
    """Whether a stopped trainer is between two writes (not past an ownership check with a write
    still to finish): no file half-written in its working directory `local_dir`, the run
    directory's resume points (`checkpoints()`, keys) exactly those its last.json (`pointer()`)
    names (none being deleted), the newest recorded in status.json, and that status.json the run
    directory's (`status()`). (A small resume point being sent in one PUT leaves no trace until it
    lands; the caller retries at another moment when this says no, and such moments are short.)"""
    if any(path.name.endswith(".tmp") for path in local_dir.rglob(".*")):
        return False
    local, points = read_json(local_dir / "status.json"), pointer().get("points") or [{}]
    recorded = local.get("lastCheckpoint", {}).get("sha256")
    return (recorded is not None and points[0].get("sha256") == recorded and status() == local
            and checkpoints() == {point.get("key") for point in points})


def frozen_after_step_3(harness: Trainer, manifest: dict, run_dir: str, status, pointer, checkpoints,
                        local_dir: Path) -> tuple[subprocess.Popen, Path]:
    """An attempt stopped with SIGSTOP (a partitioned node) between two writes, once `status()`
    (the run directory's status.json) records a resume point at step 3 or later: it still holds
    its state and will go on. `local_dir`: where it trains (the run directory, or its scratch copy)."""
    running = harness.start(manifest, run_dir)
    process, log = running.popen, running.log
    deadline = time.monotonic() + 300
    while True:
        while process.poll() is None and status().get("lastCheckpoint", {}).get("step", -1) < 3:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        assert process.poll() is None, log.read_text()[-3000:]
        process.send_signal(signal.SIGSTOP)
        if between_writes(local_dir, status, pointer, checkpoints):
            return process, log
        process.send_signal(signal.SIGCONT)
        assert time.monotonic() < deadline, "never found between two writes"
        time.sleep(0.05)


def thawed_it_writes_nothing(process: subprocess.Popen, log: Path, snapshot, claimed_by: str) -> None:
    """SIGCONT: the stale attempt trains on to its next write, finds the directory claimed, stops."""
    left = snapshot()
    process.send_signal(signal.SIGCONT)
    code = process.wait(timeout=120)
    output = log.read_text()
    assert code == SUPERSEDED_EXIT_CODE, output[-3000:]
    assert claimed_by in output and '"result": "superseded"' in output, output[-3000:]
    assert snapshot() == left, "the superseded attempt wrote to the run directory"


def test_a_re_created_run_continues_only_its_own_spec_and_fences_the_old_pod(reference, tmp_path):  # noqa: F811
    """The run is deleted while its attempt 1 hangs on a cut-off node after step 3, and re-created
    (a new uid). With another spec it is refused (exit 2, the directory untouched); with the same
    spec it continues the directory and ends exactly as the uninterrupted run; the old pod, back,
    writes nothing."""
    manifest, reference_dir = reference
    run_dir = tmp_path / "store" / "tests" / "exact"
    status = lambda: read_json(run_dir / "status.json")  # noqa: E731
    pointer = lambda: read_json(run_dir / "last.json")  # noqa: E731
    checkpoints = lambda: {p.relative_to(run_dir).as_posix() for p in run_dir.glob("checkpoints/*.ckpt")}  # noqa: E731
    process, log = frozen_after_step_3(pod(tmp_path / "node-1", UID_A, 1), manifest, str(run_dir), status,
                                       pointer, checkpoints, run_dir)
    try:
        before = files(run_dir)
        other = json.loads(json.dumps(manifest))
        other["spec"]["seed"] = 8
        termination_log = tmp_path / "termination-log"
        refused = pod(tmp_path / "node-2", UID_B, 1, KONTINUE_TERMINATION_LOG=str(termination_log)).attempt(
            other, str(run_dir))
        assert refused.exit_code == INVALID_SPEC_EXIT_CODE, refused.output[-3000:]
        message = termination_log.read_text()
        assert message.startswith("invalid input: spec.checkpoint.storage: ") and UID_A in message, message
        assert files(run_dir) == before

        same = pod(tmp_path / "node-3", UID_B, 1).attempt(manifest, str(run_dir))
        assert same.exit_code == 0, same.output[-3000:]
        assert status()["finalState"] == read_json(reference_dir / "status.json")["finalState"]
        assert status()["attempts"][-1]["fromStep"] >= 3, "continued from the old pod's resume point"
        assert read_json(run_dir / OWNER)["uid"] == UID_B
        thawed_it_writes_nothing(process, log, lambda: files(run_dir), f"uid {UID_B}), attempt 1 claimed")
    finally:
        if process.poll() is None:
            process.kill()


def test_a_stale_attempt_never_overwrites_a_newer_one_in_s3(reference, tmp_path, s3_server):  # noqa: F811
    """Attempt 1's node is cut off after its resume point at step 3; the operator's attempt 2 takes
    the S3 run directory over and is preempted at its own later resume point; attempt 1 comes back
    and must not write."""
    manifest, _ = reference
    bucket = s3_server.make_bucket("runs")
    client = s3_server.client()
    prefix, run_dir = "store/tests/exact/", f"s3://{bucket}/store/tests/exact"

    def read(name: str) -> dict:
        try:
            return json.loads(client.get_object(bucket, prefix + name).read())
        except Exception:  # not there yet
            return {}

    def status() -> dict:
        return read("status.json")

    def checkpoints() -> set[str]:
        return {o.object_name[len(prefix):] for o in client.list_objects(bucket, prefix + "checkpoints/")
                if o.object_name.endswith(".ckpt")}

    def snapshot() -> dict[str, str]:
        return {o.object_name: o.etag for o in client.list_objects(bucket, prefix, recursive=True)}

    process, log = frozen_after_step_3(pod(tmp_path / "node-1", UID_A, 1, **s3_server.environ), manifest, run_dir,
                                       status, lambda: read("last.json"), checkpoints,
                                       tmp_path / "node-1" / "scratch" / "run")
    try:
        frozen_at = status()["lastCheckpoint"]["step"]
        second = pod(tmp_path / "node-2", UID_A, 2, **s3_server.environ).attempt(
            manifest, run_dir, preempt_after_step=frozen_at + 3,
            status_file=tmp_path / "node-2" / "scratch" / "run" / "status.json")
        assert second.exit_code == PREEMPTED_EXIT_CODE, second.output[-3000:]
        assert status()["lastCheckpoint"]["step"] > frozen_at
        assert json.loads(client.get_object(bucket, prefix + OWNER).read())["attempt"] == 2
        thawed_it_writes_nothing(process, log, snapshot, "attempt 2 of this run claimed")
    finally:
        if process.poll() is None:
            process.kill()
