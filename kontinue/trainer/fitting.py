"""Trainer assembly: devices and precision, the callbacks in their order, the processes of a DDP
fit, and the final state's fingerprint. The Lightning Trainer owns the loop.

With several processes (GPUs, or `env.num_processes` on the CPU) Lightning's launcher starts the
command once more per extra rank (LOCAL_RANK=1, 2, ...); every process builds the same predictor
and Trainer and `fit` is collective. What happens around it (`process_rank`, `end_processes`):
only rank 0 writes to the run directory and finishes the run after the fit, and it waits for the
other ranks to end before it ends, so a pod's main process never exits before its children.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import subprocess
import threading
import time
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from kontinue.api.contract import PREEMPTED_EXIT_CODE
from kontinue.trainer.callbacks import BestModel, RandomState, ResumePoints, StatusReporter, TopKCandidates
from kontinue.trainer.checkpoint_io import BackgroundWriter, ResumePointIO
from kontinue.trainer.problem import Problem
from kontinue.trainer.rundir import RunDirectory

log = logging.getLogger("kontinue.trainer")
# How long rank 0 waits for the other ranks after its fit ends (they end right after theirs), and how
# long a rank that stopped (exit 75) waits for the main process to stop too, before either is taken
# as stuck in a collective and ended.
END_TIMEOUT_SECONDS = 60.0


def process_rank() -> int:
    """This process's rank in a DDP fit: 0 in the main process and when training alone, k in the copy
    of the command Lightning started for rank k (known from LOCAL_RANK before the process group is)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("LOCAL_RANK") or 0)


def devices(hp: dict[str, Any]) -> tuple[str, int | str, str, str]:
    """Every visible GPU (DDP across them, bf16 where supported), else `env.num_processes` CPU
    processes (DDP over gloo when more than one)."""
    available = torch.cuda.device_count()
    wanted = available if hp["env.num_gpus"] < 0 else min(available, hp["env.num_gpus"])
    precision = str(hp["env.precision"])
    if wanted == 0:
        processes = int(hp["env.num_processes"])
        return "cpu", processes, "ddp" if processes > 1 else "auto", "32-true" if precision == "auto" else precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "gpu", wanted, "ddp" if wanted > 1 else "auto", precision


class _RankWatch(threading.Thread):
    """Watches the other ranks from the main process, in place of Lightning's child-process observer.

    Lightning's observer SIGKILLs every process, the main one included, as soon as a child ends with
    any non-zero code. A rank that stops at a resume point exits 75 as the main process does, a
    moment before or after it; the observer turned that into a main process killed by SIGKILL (exit
    137: "killed", not the trainer's own stop), and a rank that failed in code into a kill as well
    (a preemption to the operator, not a failure). Here:

    - a rank that failed (any code but 0 and 75, or killed by a signal) ends the attempt at once:
      the other ranks are killed (they would wait for it in a collective until the process group's
      timeout) and this process exits with its code (1 for a signal);
    - a rank that stopped (75) gives this process END_TIMEOUT_SECONDS to stop too (every rank stops
      at the same resume point, so it normally does); past that it is stuck, and exits 75.

    Rank 0 stops the watch when its own fit is over (`end_processes`) and waits for the ranks itself.
    """

    def __init__(self, procs: list[subprocess.Popen], grace: float = END_TIMEOUT_SECONDS, period: float = 1.0,
                 exit: Callable[[int], None] = os._exit):
        super().__init__(daemon=True, name="kontinue-rank-watch")
        self.procs, self.grace, self.period, self._exit = procs, grace, period, exit
        self._stopped = threading.Event()
        self._lock = threading.Lock()

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()

    def run(self) -> None:
        stopped_since: float | None = None
        while not self._stopped.wait(self.period):
            codes = [proc.poll() for proc in self.procs]
            failed = [(rank, code) for rank, code in enumerate(codes, 1) if code not in (None, 0, PREEMPTED_EXIT_CODE)]
            if any(code == PREEMPTED_EXIT_CODE for code in codes):
                stopped_since = stopped_since or time.monotonic()
            if failed:
                rank, code = failed[0]
                self._end(f"rank {rank} failed (exit code {code})", code if code > 0 else 1)
            elif stopped_since is not None and time.monotonic() - stopped_since >= self.grace:
                self._end(f"another rank stopped at a resume point {self.grace:.0f}s ago and this one did not",
                          PREEMPTED_EXIT_CODE)
            elif all(code == 0 for code in codes):
                return  # they finished their fit; this process finishes the run

    def _end(self, why: str, code: int) -> None:
        with self._lock:
            if self._stopped.is_set():
                return  # rank 0's fit is over: it waits for the ranks itself
            self._stopped.set()
            log.error("%s; ending every process of this attempt with exit code %d", why, code)
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
            self._exit(code)


class _Launcher(_SubprocessScriptLauncher):
    """Lightning's launcher (the command again for each further rank), with _RankWatch for observer."""

    watch: _RankWatch | None = None

    def launch(self, function: Callable, *args: Any, trainer: pl.Trainer | None = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            self.watch = _RankWatch(self.procs)
            self.watch.start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class _DDP(DDPStrategy):
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if type(self._launcher) is _SubprocessScriptLauncher:
            self._launcher = _Launcher(self.cluster_environment, self.num_processes, self.num_nodes)


class _SignalNotes(_SignalConnector):
    """Lightning's SIGTERM handler, live from the end of set-up until ResumePoints installs its own
    (and again from the end of training until the fit returns), forwards the signal to the other
    ranks and broadcasts from inside the handler: a collective entered by rank 0 alone, wherever it
    was interrupted, which the other ranks meet in another collective (a hang, or a wrong result).
    Here it only notes the signal; ResumePoints takes it over and shares the stop at a resume point,
    as for a signal during training (after training, the attempt stops before its last steps)."""

    def _sigterm_notifier_fn(self, signum, frame) -> None:
        log.info("SIGTERM outside the training loop: the attempt stops at its next safe point")
        self.received_sigterm = True


def end_processes(trainer: pl.Trainer) -> None:
    """In rank 0 once its fit is over (finished, stopped or failed): waits for the other ranks, which
    end right after theirs, so that this process (a pod's main process, whose end ends the pod)
    ends last and with its own exit code. A rank still running after END_TIMEOUT_SECONDS is stuck
    (in a collective rank 0 left) and is killed."""
    launcher = trainer.strategy.launcher
    if not isinstance(launcher, _Launcher) or launcher.watch is None:
        return
    launcher.watch.stop()
    launcher.watch = None
    deadline = time.monotonic() + END_TIMEOUT_SECONDS
    for rank, proc in enumerate(launcher.procs, 1):
        try:
            code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("rank %d (pid %d) still runs %.0fs after the fit ended; killing it", rank, proc.pid,
                      END_TIMEOUT_SECONDS)
            proc.kill()
            code = proc.wait()
        log.info("rank %d (pid %d) ended with exit code %d", rank, proc.pid, code)


def _strategy(name: str, accelerator: str) -> str | DDPStrategy:
    if name != "ddp":
        return name
    # Parameters a step leaves without a gradient (a transformers pooler the head does not use, a
    # backbone that sees no column) would stop DDP at the second step otherwise.
    return _DDP(process_group_backend="gloo" if accelerator == "cpu" else None, find_unused_parameters=True)


def build_trainer(hp: dict[str, Any], run_dir: RunDirectory, problem: Problem, *, accumulate: int,
                  time_limit: float | None, progress_bar: bool) -> pl.Trainer:
    accelerator, device_count, strategy, precision = devices(hp)
    interval = hp["optim.val_check_interval"]
    writer = BackgroundWriter()
    run_dir.keep = hp["env.checkpoint_keep"]
    callbacks = [
        RandomState(),
        BestModel(run_dir, writer, problem.higher_is_better),
        *([TopKCandidates(run_dir, writer, problem.higher_is_better, hp["optim.top_k"])]
          if hp["optim.top_k"] > 1 and hp["optim.top_k_average_method"] != "best" else []),
        StatusReporter(run_dir),
        EarlyStopping(monitor="val_score", mode="max" if problem.higher_is_better else "min",
                      patience=hp["optim.patience"], check_on_train_epoch_end=False),
        # Last: a resume point taken at a validation must hold what the callbacks above made of it
        # (else a resumed run forgets that validation's best model), and an attempt stopped at its
        # first resume point must already be recorded in status.json.
        ResumePoints(run_dir, writer, hp["env.checkpoint_every_n_steps"], hp["env.checkpoint_every_n_minutes"]),
    ]
    trainer = pl.Trainer(
        accelerator=accelerator, devices=device_count, strategy=_strategy(strategy, accelerator), precision=precision,
        max_epochs=hp["optim.max_epochs"], max_steps=hp["optim.max_steps"],
        max_time=dt.timedelta(seconds=time_limit) if time_limit else None,
        accumulate_grad_batches=accumulate, gradient_clip_val=hp["optim.gradient_clip_val"] or None,
        gradient_clip_algorithm=hp["optim.gradient_clip_algorithm"],
        val_check_interval=min(1.0, interval) if interval <= 1 else int(interval),
        check_val_every_n_epoch=hp["optim.check_val_every_n_epoch"],
        callbacks=callbacks, plugins=[ResumePointIO(run_dir, writer)], logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
        enable_progress_bar=progress_bar, enable_model_summary=False,
        use_distributed_sampler=False, default_root_dir=str(run_dir.path),
    )
    trainer._signal_connector = _SignalNotes(trainer)
    return trainer


def state_fingerprint(module: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> str:
    """sha256 of the trained weights and optimizer state: equal only if the runs ended bit-identical."""
    digest = hashlib.sha256()

    def feed(name: str, value: Any) -> None:
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                feed(f"{name}.{key}", value[key])
        else:
            digest.update(repr(value).encode())

    feed("model", module.state_dict())
    for index, optimizer in enumerate(optimizers):
        feed(f"optimizer{index}", optimizer.state_dict()["state"])
    return digest.hexdigest()
