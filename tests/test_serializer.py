"""The checkpoint serializer process (kontinue.trainer.serializer): snapshots in shared memory,
written by a helper process at a lower CPU priority, to local disk and to the S3 server."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from kontinue.api.contract import InvalidInput
from kontinue.storage import LocalStore, StorageError
from kontinue.trainer.checkpoint_io import BackgroundWriter
from kontinue.trainer.serializer import (CANCEL, MIN_HELPER_BYTES, MIN_HELPER_BYTES_ENV, NICENESS,
                                         SPARE_BUFFERS, SerializerProcess, Snapshot, WriteCancelled,
                                         min_helper_bytes, write_checkpoint)
from tests.kube_fixtures import wait_for


def a_state() -> dict:
    """Every kind of tensor a checkpoint holds, beside plain values."""
    generator = torch.Generator().manual_seed(0)
    return {
        "state_dict": {"w": torch.randn(5, 7, generator=generator), "half": torch.randn(3, generator=generator).bfloat16(),
                       "transposed": torch.randn(4, 6, generator=generator).t(), "scalar": torch.tensor(3.5),
                       "empty": torch.empty(0, 4), "mask": torch.tensor([True, False, True])},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(12.0), "exp_avg": torch.full((2, 2), 0.25)}},
                              "param_groups": [{"lr": 1e-3, "params": [0]}]}],
        "rng": (torch.get_rng_state(), [1, 2, 3]),
        "global_step": 12, "epoch": 1, "loops": {"progress": [1, {"n": 2}]},
    }


def assert_same(loaded, expected) -> None:
    if isinstance(expected, torch.Tensor):
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        assert torch.equal(loaded, expected)
    elif isinstance(expected, dict):
        assert type(loaded) is type(expected) and list(loaded) == list(expected)
        for key in expected:
            assert_same(loaded[key], expected[key])
    elif isinstance(expected, (list, tuple)):
        assert type(loaded) is type(expected) and len(loaded) == len(expected)
        for item, want in zip(loaded, expected):
            assert_same(item, want)
    else:
        assert loaded == expected


@pytest.fixture(scope="module")
def serializer():
    process = SerializerProcess(min_bytes=0)
    process.start(wait=True)
    yield process
    process.close()


def test_a_snapshot_is_not_changed_by_training_on_and_the_helper_writes_it_whole(serializer, tmp_path):
    state = a_state()
    expected = {"state_dict": {k: v.clone() for k, v in state["state_dict"].items()}}
    snapshot = Snapshot(state, serializer)
    state["state_dict"]["w"].add_(1)  # training goes on
    state["loops"]["progress"][1]["n"] = 9
    assert snapshot["global_step"] == 12 and snapshot["loops"]["progress"][1]["n"] == 2

    store = LocalStore(tmp_path)
    info = write_checkpoint(store, "checkpoints/step-12.ckpt", snapshot)
    assert info.size == (tmp_path / "checkpoints/step-12.ckpt").stat().st_size
    assert store.verify("checkpoints/step-12.ckpt") == info.sha256
    loaded = torch.load(tmp_path / "checkpoints/step-12.ckpt", weights_only=True)
    state["state_dict"] = expected["state_dict"]
    state["loops"]["progress"][1]["n"] = 2
    assert_same(loaded, state)
    assert not loaded["state_dict"]["w"].untyped_storage().nbytes() > 5 * 7 * 4, "each tensor is its own record"


def test_the_helper_and_the_training_process_write_the_same_checkpoint(serializer, tmp_path):
    """The same checkpoint whoever writes it: the helper, this process from a snapshot, or torch.save
    of the live state."""
    store = LocalStore(tmp_path)
    here = write_checkpoint(store, "here.ckpt", Snapshot(a_state()))
    there = write_checkpoint(store, "there.ckpt", Snapshot(a_state(), serializer))
    write_checkpoint(store, "plain.ckpt", a_state())
    plain = torch.load(tmp_path / "plain.ckpt", weights_only=True)
    assert_same(torch.load(tmp_path / "there.ckpt", weights_only=True), plain)
    assert_same(torch.load(tmp_path / "here.ckpt", weights_only=True), plain)
    assert here.size == there.size


def _buffer_of(snapshot: Snapshot) -> int:
    """The inode of a snapshot's shared-memory buffer: the same buffer, the same inode."""
    return os.fstat(snapshot.fd).st_ino


def test_a_written_snapshots_buffer_takes_the_next_one_of_its_size_and_never_a_live_ones(serializer, tmp_path):
    """The loop waits while a snapshot is copied, and a fresh buffer is allocated and zeroed as the
    copy goes: freed buffers are kept mapped for the next snapshot of their size, a few of them."""
    store = LocalStore(tmp_path)
    first = Snapshot(a_state(), serializer)
    held = Snapshot(a_state(), serializer)  # one still being written or waiting: never shared
    assert _buffer_of(first) != _buffer_of(held)
    write_checkpoint(store, "a.ckpt", first)
    buffer = _buffer_of(first)
    del first

    state = a_state()
    state["state_dict"]["w"].mul_(-3)  # the same sizes, other values
    again = Snapshot(state, serializer)
    assert _buffer_of(again) == buffer, "the freed buffer takes the next snapshot of its size"
    write_checkpoint(store, "b.ckpt", again)
    assert_same(torch.load(tmp_path / "b.ckpt", weights_only=True), state)

    larger = a_state()
    larger["state_dict"]["extra"] = torch.ones(1000)
    other = Snapshot(larger, serializer)
    assert _buffer_of(other) not in (buffer, _buffer_of(held)), "a buffer is only taken by a snapshot of its size"
    write_checkpoint(store, "c.ckpt", other)
    assert_same(torch.load(tmp_path / "c.ckpt", weights_only=True), larger)

    kept = [Snapshot({"w": torch.full((64 * size,), float(size))}) for size in range(1, SPARE_BUFFERS + 3)]
    inodes = [_buffer_of(snapshot) for snapshot in kept]
    while kept:  # freed smallest first: the last SPARE_BUFFERS freed are kept
        kept.pop(0)
    taken = [Snapshot({"w": torch.zeros(64 * size)}) for size in range(1, SPARE_BUFFERS + 3)]
    assert [_buffer_of(snapshot) == inode for snapshot, inode in zip(taken, inodes)] == \
        [False] * 2 + [True] * SPARE_BUFFERS
    for size, snapshot in enumerate(taken, start=1):
        write_checkpoint(store, f"taken-{size}.ckpt", snapshot)
        assert torch.equal(torch.load(tmp_path / f"taken-{size}.ckpt", weights_only=True)["w"], torch.zeros(64 * size))


def test_a_forked_child_lets_go_of_the_spare_buffers():
    """A loader worker forked while buffers are spare does not keep them allocated after the trainer
    freed them."""
    snapshot = Snapshot({"w": torch.ones(4096)})
    spare = _buffer_of(snapshot)
    del snapshot
    child = os.fork()
    if child == 0:  # the child: is the spare's memfd still open here?
        held = any("memfd:kontinue-snapshot" in os.readlink(f"/proc/self/fd/{fd}")
                   and os.stat(f"/proc/self/fd/{fd}").st_ino == spare
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))
        os._exit(1 if held else 0)
    assert os.waitpid(child, 0)[1] == 0
    assert _buffer_of(Snapshot({"w": torch.zeros(4096)})) == spare, "the parent still has it"


def test_the_helper_runs_at_a_lower_priority_and_ignores_stop_signals(serializer, tmp_path):
    store = LocalStore(tmp_path)
    write_checkpoint(store, "a.ckpt", Snapshot(a_state(), serializer))
    helper = serializer._process.pid
    lower = min(19, os.getpriority(os.PRIO_PROCESS, 0) + NICENESS)
    threads = [int(thread) for thread in os.listdir(f"/proc/{helper}/task")]
    assert {thread: os.getpriority(os.PRIO_PROCESS, thread) for thread in threads} == dict.fromkeys(threads, lower)
    os.kill(helper, signal.SIGTERM)  # the trainer decides when writing stops, not a signal to the group
    os.kill(helper, signal.SIGINT)
    write_checkpoint(store, "b.ckpt", Snapshot(a_state(), serializer))
    assert serializer._process.pid == helper
    store.verify("b.ckpt")


def test_a_failed_write_is_raised_in_the_trainer_and_the_helper_goes_on(serializer, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StorageError, match="a-file"):
        write_checkpoint(LocalStore(tmp_path / "a-file"), "x.ckpt", Snapshot(a_state(), serializer))
    write_checkpoint(LocalStore(tmp_path), "y.ckpt", Snapshot(a_state(), serializer))
    LocalStore(tmp_path).verify("y.ckpt")


def test_a_helper_that_dies_during_a_write_is_reported_and_replaced(tmp_path):
    serializer = SerializerProcess(min_bytes=0)
    serializer.start(wait=True)
    store = LocalStore(tmp_path)
    write_checkpoint(store, "a.ckpt", Snapshot(a_state(), serializer))
    helper = serializer._process
    os.kill(helper.pid, signal.SIGSTOP)  # holds the next write where it is
    failures: list[BaseException] = []

    def write() -> None:
        try:
            write_checkpoint(store, "b.ckpt", Snapshot(a_state(), serializer))
        except BaseException as error:  # noqa: BLE001 -- looked at below
            failures.append(error)

    writing = threading.Thread(target=write)
    writing.start()
    time.sleep(0.5)
    helper.kill()  # the OOM killer, say
    writing.join(30)
    assert len(failures) == 1 and isinstance(failures[0], StorageError), failures
    assert "serializer process ended (exit code -9)" in str(failures[0]) and "b.ckpt" in str(failures[0])
    assert not store.exists("b.ckpt")
    serializer.start(wait=True)  # a new helper
    write_checkpoint(store, "c.ckpt", Snapshot(a_state(), serializer))
    assert serializer._process.pid != helper.pid
    store.verify("c.ckpt")
    serializer.close()


def test_the_helper_stops_when_the_trainer_is_killed(tmp_path):
    """SIGKILL at the end of a grace period: the helper leaves at once, nothing half-written appears."""
    trainer = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os, torch
        from kontinue.storage import LocalStore
        from kontinue.trainer.serializer import SerializerProcess, Snapshot, write_checkpoint
        serializer = SerializerProcess(min_bytes=0)
        serializer.start(wait=True)
        write_checkpoint(LocalStore({str(tmp_path)!r}), "a.ckpt", Snapshot({{"w": torch.ones(3)}}, serializer))
        print(serializer._process.pid, flush=True)
        os._exit(0)
    """)], capture_output=True, text=True, timeout=120, check=True)
    helper = int(trainer.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(helper, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the helper outlived its trainer by 10 s")


def test_a_snapshot_reaches_the_s3_server_through_the_helper(serializer, s3_store):
    info = write_checkpoint(s3_store, "checkpoints/step-12.ckpt", Snapshot(a_state(), serializer))
    assert s3_store.verify("checkpoints/step-12.ckpt") == info.sha256
    assert s3_store.stat("checkpoints/step-12.ckpt").size == info.size


def test_a_helper_that_cannot_start_leaves_the_writes_to_the_trainer(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a helper that exits at once
    serializer = SerializerProcess(min_bytes=0)
    serializer.start(wait=True)
    store = LocalStore(tmp_path)
    for key in ("a.ckpt", "b.ckpt"):
        info = write_checkpoint(store, key, Snapshot(a_state(), serializer))
        assert store.verify(key) == info.sha256
    assert "serialised in the trainer's own process" in caplog.text
    assert serializer._process is None, "not started again and again"


def test_a_small_snapshot_is_written_by_the_trainers_thread(tmp_path):
    """Below `min_bytes` the helper is not used (nor started): little CPU to save, durability sooner."""
    serializer = SerializerProcess(min_bytes=1 << 20)
    store = LocalStore(tmp_path)
    info = write_checkpoint(store, "small.ckpt", Snapshot(a_state(), serializer))
    assert store.verify("small.ckpt") == info.sha256
    assert serializer._process is None


def test_the_size_from_which_the_helper_writes_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(MIN_HELPER_BYTES_ENV, raising=False)
    assert min_helper_bytes() == MIN_HELPER_BYTES
    monkeypatch.setenv(MIN_HELPER_BYTES_ENV, "0")
    assert min_helper_bytes() == 0
    for wrong in ("-1", "1e9", "128MiB", "", "²"):
        monkeypatch.setenv(MIN_HELPER_BYTES_ENV, wrong)
        with pytest.raises(InvalidInput, match=MIN_HELPER_BYTES_ENV):
            min_helper_bytes()


def test_once_training_stopped_snapshots_are_written_at_the_trainers_priority(serializer, tmp_path):
    """A stopping trainer's final resume point is written by its own writer thread, not by the
    helper at a lower priority: nothing is left to leave the CPU to."""
    writer = BackgroundWriter(serializer)
    assert writer.snapshot(a_state()).serializer is serializer
    writer.training_stopped()
    final = writer.snapshot(a_state())
    assert final.serializer is None
    write_checkpoint(LocalStore(tmp_path), "final.ckpt", final)
    assert_same(torch.load(tmp_path / "final.ckpt", weights_only=True), a_state())


class GatedStore(LocalStore):
    """A local store whose object writes, in whichever process runs them, say they have begun
    (`<key>.begun` beside the store) and then hold until the gate file exists."""

    def __init__(self, root: pathlib.Path, gate: pathlib.Path):
        super().__init__(root)
        self.gate = gate

    def begun(self, key: str) -> pathlib.Path:
        return self.root.parent / f"{key}.begun"

    @contextlib.contextmanager
    def _open(self, key: str):
        with super()._open(key) as sink:
            yield _Held(sink, self.begun(key), self.gate)


class _Held:
    def __init__(self, sink, begun: pathlib.Path, gate: pathlib.Path):
        self.sink, self.begun, self.gate = sink, begun, gate

    def write(self, data: bytes) -> int:
        if not self.begun.exists():
            self.begun.touch()
            wait_for(self.gate.exists, 60, "the gate", interval=0.01)
        return self.sink.write(data)

    def flush(self) -> None:
        self.sink.flush()


def nothing_but(directory: pathlib.Path, *names: str) -> bool:
    """Whether `directory` holds exactly these files (temporaries of a stopped write included)."""
    return sorted(p.name for p in directory.iterdir()) == sorted(names)


def test_a_stop_cancels_the_resume_point_the_helper_is_writing(serializer, tmp_path, caplog):
    """The final resume point supersedes the one in flight: the helper stops that write before its
    object is stored (nothing of it is left) instead of the stop waiting for it, and goes on."""
    store = GatedStore(tmp_path / "store", tmp_path / "gate")
    writer = BackgroundWriter(serializer)

    def resume_point(key: str) -> None:
        state = writer.snapshot(a_state())
        writer.submit(lambda: write_checkpoint(store, key, state), f"resume point {key}", supersedable=True,
                      cancel=state.cancel)

    resume_point("step-1.ckpt")
    wait_for(store.begun("step-1.ckpt").exists, 60, "the helper's write", interval=0.01)
    with caplog.at_level(logging.INFO, "kontinue.trainer"):
        writer.training_stopped()
    (tmp_path / "gate").touch()
    resume_point("step-2.ckpt")
    writer.flush()  # the cancelled write is no failure

    assert "resume point step-1.ckpt is cancelled: the final resume point supersedes it" in caplog.text
    assert nothing_but(store.root, "step-2.ckpt", "step-2.ckpt.sha256")
    assert_same(torch.load(store.root / "step-2.ckpt", weights_only=True), a_state())
    after = LocalStore(tmp_path / "after")
    write_checkpoint(after, "a.ckpt", Snapshot(a_state(), serializer))
    after.verify("a.ckpt")


def test_a_cancelled_write_in_the_trainers_thread_stores_nothing(tmp_path):
    store = GatedStore(tmp_path / "store", tmp_path / "gate")
    snapshot, failures = Snapshot(a_state()), []

    def write() -> None:
        try:
            write_checkpoint(store, "a.ckpt", snapshot)
        except BaseException as error:  # noqa: BLE001 -- looked at below
            failures.append(error)

    writing = threading.Thread(target=write)
    writing.start()
    wait_for(store.begun("a.ckpt").exists, 60, "the write", interval=0.01)
    snapshot.cancel()
    (tmp_path / "gate").touch()
    writing.join(60)
    assert len(failures) == 1 and isinstance(failures[0], WriteCancelled), failures
    assert nothing_but(store.root)


def test_a_write_done_before_its_cancel_stays_done(serializer, tmp_path):
    """A cancel that reaches the helper after the write (it is sent while the write is in flight)
    is ignored there: the next write is not the one it stops."""
    store = LocalStore(tmp_path)
    done = Snapshot(a_state(), serializer)
    write_checkpoint(store, "a.ckpt", done)
    done.cancel()
    serializer._connection.send_bytes(CANCEL)  # as one sent just before the helper's reply arrived
    write_checkpoint(store, "b.ckpt", Snapshot(a_state(), serializer))
    store.verify("a.ckpt")
    store.verify("b.ckpt")
