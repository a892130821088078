"""DDP on the CPU: two gloo processes (`env.num_processes: 2`), as Lightning's launcher runs them.

`kontinue train` is started as a pod starts it; Lightning runs the command once more for rank 1.
A run at world size 2 is deterministic, a SIGTERM to the main process alone (what a kubelet sends)
stops every rank at one resume point and the resumed run ends bit-identical to an uninterrupted
one, and rank 1 never writes to the run directory or the termination message. Every file write,
rename, removal and new directory there is recorded per rank by an audit hook (`sitecustomize`
below, loaded in every process of an attempt), so "only rank 0 writes" is measured, not assumed
(torch.save's and safetensors' own writers bypass Python's `open`; in the run directory they only
write temporaries that are then renamed, which the hook sees).

The whole file takes about 3 minutes on 2 cores (each attempt starts two Python processes).
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from kontinue.api.contract import PREEMPTED_EXIT_CODE
from kontinue.api.hyperparameters import HyperparameterError, validate_hyperparameters
from kontinue.trainer.callbacks import RandomState
from kontinue.trainer.data import ResumableBatchSampler
from kontinue.trainer.fitting import _Launcher, _RankWatch, build_trainer, devices
from kontinue.trainer.problem import Problem
from kontinue.trainer.rundir import RunDirectory
from tests.test_resume import assert_same_outcome, read_status
from tests.trainer_fixtures import Trainer, training_run

WORLD_SIZE = 2
AUDIT = '''
import os, sys

_watched = [os.path.abspath(p) for p in os.environ.get("KONTINUE_TEST_WATCH", "").split(os.pathsep) if p]
_record = os.environ.get("KONTINUE_TEST_WRITES")
if _watched and _record:
    _log = open(f"{_record}.rank{os.environ.get('LOCAL_RANK', '0')}", "a", buffering=1)
    _writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def _watched_path(path):
        try:
            path = os.path.abspath(os.fsdecode(os.fspath(path)))
        except TypeError:
            return None  # a file descriptor
        return path if any(path == w or path.startswith(w + os.sep) for w in _watched) else None

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not ((mode and any(c in mode for c in "wax+")) or (flags or 0) & _writing):
                return
            paths = [path]
        elif event == "os.mkdir":
            paths = [] if os.path.isdir(args[0]) else [args[0]]  # mkdir(exist_ok=True) changes nothing
        elif event in ("os.rename", "os.remove", "os.rmdir", "os.truncate", "os.link", "os.symlink",
                       "shutil.copyfile", "shutil.rmtree", "shutil.move"):
            paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
        else:
            return
        for path in filter(None, map(_watched_path, paths)):
            _log.write(f"{event} {path}\\n")

    sys.addaudithook(_hook)
'''


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DDPTrainer(Trainer):
    """The harness with two CPU processes on loopback, a fresh MASTER_PORT per attempt (parallel
    test runs never meet), a termination message file, and the write audit."""

    def __init__(self, workdir: Path, watched: list[Path]):
        workdir.mkdir(parents=True, exist_ok=True)
        audit = workdir / "audit"
        audit.mkdir(exist_ok=True)
        (audit / "sitecustomize.py").write_text(AUDIT)
        self.termination_log = workdir / "termination-log"
        self.writes = workdir / "writes"
        super().__init__(workdir, {
            "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": os.pathsep.join(filter(None, [str(audit), os.environ.get("PYTHONPATH")])),
            "KONTINUE_TERMINATION_LOG": str(self.termination_log), "KONTINUE_TEST_WRITES": str(self.writes),
            "KONTINUE_TEST_WATCH": os.pathsep.join(str(p) for p in [*watched, self.termination_log])})

    def attempt(self, manifest: dict, run_dir: str, **options):
        self.environ["MASTER_PORT"] = str(free_port())
        return super().attempt(manifest, run_dir, **options)

    def written(self, rank: int) -> list[str]:
        path = Path(f"{self.writes}.rank{rank}")
        return path.read_text().splitlines() if path.exists() else []

    def termination_message(self) -> dict:
        return json.loads(self.termination_log.read_text())


def ranks_ended(output: str) -> dict[int, tuple[int, int]]:
    """What rank 0 logged about the other ranks once its fit was over: rank -> (pid, exit code)."""
    ended = {}
    for line in output.splitlines():
        if "kontinue.trainer: rank " in line and " ended with exit code " in line:
            words = line.split("kontinue.trainer: rank ", 1)[1].split()
            ended[int(words[0])] = (int(words[2].rstrip(")")), int(words[-1]))
    return ended


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_only_rank_0_wrote(harness: DDPTrainer, run_dir: Path) -> None:
    assert harness.written(1) == [], f"rank 1 wrote: {harness.written(1)[:10]}"
    assert any(line.endswith(str(run_dir / "status.json")) for line in harness.written(0)), \
        "the audit saw none of rank 0's writes: it is not measuring anything"


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory, tiny_bert, review_tables) -> tuple[dict, Path]:
    """An uninterrupted run at world size 2."""
    workdir = tmp_path_factory.mktemp("ddp-reference")
    manifest = training_run("exact", str(workdir / "store"), review_tables, tiny_bert,
                            hyperparameters={"env.num_processes": WORLD_SIZE})
    run_dir = workdir / "store" / "tests" / "exact"
    harness = DDPTrainer(workdir, [run_dir])
    attempt = harness.attempt(manifest, str(run_dir))
    assert attempt.exit_code == 0, attempt.output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in attempt.output  # two processes trained, not one
    assert_only_rank_0_wrote(harness, run_dir)
    return manifest, run_dir


def test_a_world_size_2_run_succeeds_is_deterministic_and_only_rank_0_finishes_it(ddp_reference, tmp_path):
    manifest, reference_dir = ddp_reference
    run_dir = tmp_path / "store" / "tests" / "exact"
    harness = DDPTrainer(tmp_path, [run_dir])
    attempt = harness.attempt(manifest, str(run_dir))
    assert attempt.exit_code == 0, attempt.output[-3000:]

    status = assert_same_outcome(run_dir, reference_dir)  # finalState, metrics, model.ckpt weights
    assert status["finalState"]["step"] == 30  # 240 rows, 2 x 8 a step: 15 steps an epoch
    assert [a["outcome"] for a in status["attempts"]] == ["completed"]
    assert status["testMetrics"] and status["dumpedModel"].endswith("/dump")
    assert (run_dir / "dump" / "hf_text" / "model.safetensors").exists()
    assert not (run_dir / "last.ckpt").exists()
    assert_only_rank_0_wrote(harness, run_dir)
    assert harness.termination_message()["result"] == "succeeded"
    assert attempt.output.count('{"result": "succeeded"') == 1  # the outcome is rank 0's word alone
    (pid, code), = ranks_ended(attempt.output).values()
    assert code == 0 and gone(pid)


def test_sigterm_to_the_main_process_stops_every_rank_and_the_run_resumes_bit_identical(ddp_reference, tmp_path):
    """Only rank 0 gets the SIGTERM (as from a kubelet); the stop is shared, every rank saves at the
    same step and exits 75, rank 0 last. The resumed run at world size 2 ends as the reference."""
    manifest, reference_dir = ddp_reference
    total = read_status(reference_dir)["finalState"]["step"]
    run_dir = tmp_path / "store" / "tests" / "exact"
    harness = DDPTrainer(tmp_path, [run_dir])
    seed = random.randrange(1 << 30)
    after = random.Random(seed).randint(1, 24)

    stopped = harness.attempt(manifest, str(run_dir), preempt_after_step=after)
    assert stopped.exit_code == PREEMPTED_EXIT_CODE, f"seed {seed}:\n{stopped.output[-3000:]}"
    stopped_at = read_status(run_dir)["lastCheckpoint"]["step"]
    assert after <= stopped_at < total, f"seed {seed}: stopped at {stopped_at}"
    (pid, code), = ranks_ended(stopped.output).values()
    assert code == PREEMPTED_EXIT_CODE and gone(pid), f"seed {seed}: rank 1 ended with {code}"
    assert stopped.output.count(f"stopped at step {stopped_at};") == WORLD_SIZE  # both ranks, one step
    assert harness.termination_message()["result"] == "preempted"
    assert_only_rank_0_wrote(harness, run_dir)

    final = harness.attempt(manifest, str(run_dir))
    assert final.exit_code == 0, f"seed {seed}:\n{final.output[-3000:]}"
    status = assert_same_outcome(run_dir, reference_dir)
    assert [(a["fromStep"], a["toStep"], a["outcome"]) for a in status["attempts"]] == \
        [(0, stopped_at, "preempted"), (stopped_at, total, "completed")], f"seed {seed}"
    assert_only_rank_0_wrote(harness, run_dir)


# -- units ----------------------------------------------------------------------------------------

def _draws() -> tuple[list[float], float, float]:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _round_trip(state: dict) -> dict:
    """As a resume point is written and read back."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_each_rank_gets_its_own_random_state_back(monkeypatch):
    """Rank 1's states (taken here first) and this process's as rank 0 are gathered into one
    checkpoint (a stand-in for the gloo all_gather_object the DDP runs above go through); after
    the generators moved on, each rank gets its own states back."""
    _seed(101)
    rank_1_state = RandomState._local_state()
    rank_1_next = _draws()
    gathered = []

    def all_gather_object(into: list, state: dict) -> None:
        into[:] = [state, rank_1_state]
        gathered.append(state)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: WORLD_SIZE)
    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    _seed(100)
    saved = _round_trip(RandomState().state_dict())
    rank_0_next = _draws()
    assert len(gathered) == 1 and len(saved["ranks"]) == WORLD_SIZE
    assert rank_0_next != rank_1_next

    for rank, expected in enumerate((rank_0_next, rank_1_next)):
        _draws()
        callback = RandomState()
        callback.load_state_dict(saved)
        callback.on_train_batch_start(SimpleNamespace(global_rank=rank), None, None, 0)
        assert _draws() == expected, f"rank {rank}"


def test_a_single_random_state_goes_to_every_rank():
    """The format written before states were per rank, and a checkpoint of fewer ranks."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    old = {"torch": torch.get_rng_state(), "python": [python_state[0], list(python_state[1]), python_state[2]],
           "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]]}
    old = _round_trip(old)
    after_old = _draws()
    one_rank = _round_trip(RandomState().state_dict())
    after_one_rank = _draws()
    for saved, expected in ((old, after_old), (one_rank, after_one_rank)):
        for rank in range(WORLD_SIZE):
            _draws()
            callback = RandomState()
            callback.load_state_dict(saved)
            callback.on_train_batch_start(SimpleNamespace(global_rank=rank), None, None, 0)
            assert _draws() == expected, f"rank {rank}"


def test_each_rank_takes_its_own_slice_of_every_step_and_resumes_at_the_same_batch(monkeypatch):
    size, batch_size = 37, 4  # the last step is short: it is topped up so both slices are equal
    rank = {"value": 0}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: rank["value"])

    def batches(sampler: ResumableBatchSampler, of_rank: int) -> list[list[int]]:
        rank["value"] = of_rank
        return [[row for row, _ in batch] for batch in sampler]

    for epoch in range(2):
        sampler = ResumableBatchSampler(size, batch_size, seed=3, world_size=WORLD_SIZE)
        sampler.set_epoch(epoch)
        slices = [batches(sampler, r) for r in range(WORLD_SIZE)]
        global_batches = sampler._global_batches()
        assert len(slices[0]) == len(slices[1]) == len(sampler) == len(global_batches)
        for first, second, whole in zip(*slices, global_batches):
            assert len(first) == len(second) and sorted(first + second) == sorted(whole)
        seen = [row for step in zip(*slices) for part in step for row in part]
        assert set(seen) == set(range(size))
        for consumed in (1, 5, len(sampler) - 1):
            resumed = ResumableBatchSampler(size, batch_size, seed=3, world_size=WORLD_SIZE)
            resumed.set_epoch(epoch)
            for r in range(WORLD_SIZE):
                resumed.load_state_dict({"epoch": epoch, "consumed": consumed})
                assert batches(resumed, r) == slices[r][consumed:], f"epoch {epoch}, rank {r}, {consumed}"
    # A loader for one process (evaluate after a DDP fit) takes every row, whatever the rank.
    rank["value"] = 1
    alone = ResumableBatchSampler(size, batch_size, seed=3, shuffle=False, world_size=1)
    assert [row for batch in alone for row, _ in batch] == list(range(size))


def test_num_processes_is_validated_and_makes_a_ddp_fit_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert devices(validate_hyperparameters({})) == ("cpu", 1, "auto", "32-true")
    assert devices(validate_hyperparameters({"env.num_processes": 2})) == ("cpu", 2, "ddp", "32-true")
    for wrong in (0, 1.5, "2", True):
        with pytest.raises(HyperparameterError, match="env.num_processes"):
            validate_hyperparameters({"env.num_processes": wrong})


def test_a_sigterm_before_the_first_step_is_only_noted_not_forwarded_or_broadcast(tmp_path, monkeypatch):
    """Lightning's own SIGTERM handler (live from the end of set-up until ResumePoints takes over)
    forwards the signal to the other ranks and broadcasts from inside the handler, a collective of
    rank 0 alone; kontinue's Trainer only notes it, for ResumePoints to share at a resume point."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    problem = Problem.from_data("label", pd.DataFrame({"label": [0, 1, 0, 1]}), None, None)
    hp = validate_hyperparameters({"env.num_processes": WORLD_SIZE})
    trainer = build_trainer(hp, RunDirectory(tmp_path), problem, accumulate=1, time_limit=None, progress_bar=False)
    assert trainer.num_devices == WORLD_SIZE and isinstance(trainer.strategy.launcher, _Launcher)
    forwarded = []
    monkeypatch.setattr(trainer.strategy.launcher, "kill", forwarded.append)
    trainer._signal_connector.register_signal_handlers()
    try:
        signal.raise_signal(signal.SIGTERM)
        assert trainer.received_sigterm and forwarded == []
    finally:
        trainer._signal_connector.teardown()


def _process(code: int | None) -> subprocess.Popen:
    script = "import time; time.sleep(60)" if code is None else f"import sys; sys.exit({code})"
    return subprocess.Popen([sys.executable, "-c", script])


@pytest.mark.parametrize("codes, grace, exit_code", [
    ((1, None), 30.0, 1),                         # a rank failed: end at once, with its code
    ((PREEMPTED_EXIT_CODE, None), 0.5, PREEMPTED_EXIT_CODE),  # stopped, and rank 0 did not follow
    ((PREEMPTED_EXIT_CODE, 0), 30.0, None),       # stopped: rank 0 has time to stop too
    ((0, 0), 0.5, None),                          # done with the fit: rank 0 finishes the run
])
def test_the_rank_watch_ends_the_attempt_only_for_a_failed_or_stuck_rank(codes, grace, exit_code):
    procs = [_process(code) for code in codes]
    exits: list[int] = []
    watch = _RankWatch(procs, grace=grace, period=0.05, exit=exits.append)
    try:
        watch.start()
        if exit_code is None:
            time.sleep(1.5)  # the processes have ended (or not) and any grace of 0.5 s is over
        deadline = time.monotonic() + 10
        while not exits and exit_code is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        watch.stop()
        watch.join(5)
        assert exits == ([] if exit_code is None else [exit_code])
        if exit_code is not None:
            assert all(proc.wait(5) is not None for proc in procs)  # the others were killed
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
