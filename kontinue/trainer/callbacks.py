"""Lightning callbacks, one concern each: random state, resume points, the best model, status."""

from __future__ import annotations

import random
import signal
import time
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist

from kontinue.api.contract import PREEMPTED_EXIT_CODE
from kontinue.trainer.checkpoint_io import BackgroundWriter
from kontinue.trainer.ownership import Superseded
from kontinue.trainer.rundir import CANDIDATES_FIELD, now
from kontinue.trainer.signals import STOP_REQUESTED, keep_stop_for_last_steps

if TYPE_CHECKING:
    from kontinue.trainer.rundir import RunDirectory



class Preempted(SystemExit):
    """Raised once the resume point is safe after SIGTERM/SIGINT; uncaught, the process exits 75."""

    def __init__(self, step: int):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


class RandomState(pl.Callback):
    """Carries every RNG state through a checkpoint so dropout after a resume matches.

    Under DDP each process draws its own numbers (its batches differ), so the checkpoint holds every
    rank's states, gathered when it is taken ({"ranks": [rank 0's, rank 1's, ...]}), and each rank
    gets its own back. A checkpoint with one state (written before states were per rank) gives it to
    every rank, and so does one taken with fewer ranks than resume it.

    States are put back at the first training batch after a restore, after Lightning and the
    data loaders have finished their own set-up.
    """

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] | None = None

    @staticmethod
    def _local_state() -> dict[str, Any]:
        python_state = random.getstate()
        numpy_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "python": [python_state[0], list(python_state[1]), python_state[2]],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def state_dict(self) -> dict[str, Any]:
        """Collective under DDP: every rank takes part in every checkpoint (Lightning's save_checkpoint
        is called by all of them)."""
        state = self._local_state()
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_world_size() == 1:
            return {"ranks": [state]}
        states: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(states, state)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = list(state_dict["ranks"]) if "ranks" in state_dict else [state_dict]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        state = states[trainer.global_rank] if trainer.global_rank < len(states) else states[0]
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        numpy_state = state["numpy"]
        np.random.set_state((numpy_state[0], np.asarray(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class _Vote:
    """Flags every process raises at a step (stop, save, a failed write), combined across processes
    without stalling the step: the all-reduce started at one step is read at the next, over a gloo
    group, so no device is synchronised. In a single process a vote is its own outcome at once."""

    def __init__(self, trainer: pl.Trainer):
        self.distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        self._group = dist.new_group(backend="gloo") if self.distributed else None
        self._pending: tuple[Any, torch.Tensor] | None = None

    def cast(self, flags: list[int]) -> list[int]:
        """Starts this step's vote; returns the previous step's outcome (the maximum of each flag)."""
        if not self.distributed:
            return flags
        outcome = self.close() or [0] * len(flags)
        votes = torch.tensor(flags, dtype=torch.int32)
        work = dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, votes)
        return outcome

    def close(self) -> list[int] | None:
        """The outcome of the vote still open, if any."""
        if self._pending is None:
            return None
        (work, votes), self._pending = self._pending, None
        work.wait()
        return votes.tolist()


def validation_follows(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether Lightning validates right after this training batch, from the Trainer's public
    attributes: its rule for the loaders and intervals a fit configures (a sized training loader, a
    fraction of an epoch or a number of batches, every Nth epoch)."""
    every = trainer.check_val_every_n_epoch
    if not trainer.enable_validation or (every is not None and (trainer.current_epoch + 1) % every):
        return False
    if trainer.should_stop:
        return True
    if trainer.val_check_batch == float("inf"):
        return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    iteration = batch_idx if every is not None else trainer.fit_loop.epoch_loop.total_batch_idx
    return (iteration + 1) % trainer.val_check_batch == 0


# What a failed background write is, in a vote: 1 superseded (stop, nothing lost), 2 any other failure.
_SUPERSEDED, _WRITE_FAILED = 1, 2


class ResumePoints(pl.Callback):
    """Takes a resume point every N steps / minutes, and at once when asked to stop.

    A resume point is taken only where an uninterrupted run would pass too: after an optimizer
    step, and after the validation that follows it when one is due. Taking one copies the state and
    hands it to the background writer (kontinue.trainer.checkpoint_io); training goes on while it
    is written. SIGTERM and SIGINT only set a flag; at the next such point the final resume point
    is taken, every write is waited for, and `Preempted` ends the fit.
    """

    def __init__(self, run_dir: "RunDirectory", writer: BackgroundWriter, every_n_steps: int | None,
                 every_n_minutes: float | None):
        self.run_dir, self.writer = run_dir, writer
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_minutes * 60 if every_n_minutes else None
        self.stop_requested = False
        self._stop_agreed = False
        self._last_save = time.monotonic()
        self._save_pending = False
        self._steps_seen = 0
        self._mid_step = False  # the last batch accumulated gradients without an optimizer step
        self._vote: _Vote | None = None
        self._previous_handlers: dict[int, Any] = {}

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        # The writing process starts its serializer while the fit sets up, if the checkpoints will
        # be big enough to use it (weights and AdamW's two moments: three times the parameters).
        weights = sum(p.numel() * p.element_size() for p in pl_module.parameters())
        if trainer.is_global_zero and 3 * weights >= self.writer.serializer.min_bytes:
            self.writer.serializer.start()

    def on_train_start(self, trainer, pl_module) -> None:
        # Installed after Lightning's own handlers so a stop never aborts a step or a validation.
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._request_stop)
        if trainer.received_sigterm or STOP_REQUESTED.is_set():
            # It came during set-up, before ours: take it over, or Lightning ends the fit with its
            # own SIGTERMException (exit code 0) without a resume point.
            self.stop_requested = True
            trainer._signal_connector.received_sigterm = False
        self._vote = _Vote(trainer)
        self._steps_seen = trainer.global_step
        self._stop_agreed = trainer.strategy.reduce_boolean_decision(self.stop_requested, all=False)
        if trainer.ckpt_path is None:  # the starting weights are state too (pretrained or continued)
            self._save(trainer)
        elif self._stop_agreed:  # resumed, nothing trained since the checkpoint
            raise Preempted(trainer.global_step)
        self._last_save = time.monotonic()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        if self.stop_requested:  # and the fit ended without acting on it, or is stopping anyway
            keep_stop_for_last_steps()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()
        self._vote.close()
        self.writer.flush()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()
        self.writer.flush(raise_error=False)  # what is being written is a valid earlier state

    def _time_due(self) -> bool:
        return bool(self.every_n_seconds and time.monotonic() - self._last_save >= self.every_n_seconds)

    def _write_failure(self) -> int:
        error = self.writer.error
        return 0 if error is None else _SUPERSEDED if isinstance(error, Superseded) else _WRITE_FAILED

    def _raise_write_failure(self, trainer, failure: int) -> None:
        """Every process stops on a failed write, which only the writing process (rank 0) knows of."""
        self.writer.check()
        if failure == _SUPERSEDED:
            raise Superseded("a newer attempt holds the run directory (found while rank 0 wrote a resume point)")
        if failure:
            raise RuntimeError("rank 0 could not write a resume point (see its log)")

    def _save(self, trainer) -> None:
        self._save_pending = False
        key = self.run_dir.resume_point_key(trainer.global_step) if trainer.is_global_zero else "unused"
        if self._stop_agreed:
            self.writer.training_stopped()
        trainer.save_checkpoint(key, weights_only=False)  # returns once the state is copied
        self._last_save = time.monotonic()
        if self._stop_agreed:
            self.writer.flush()  # the final resume point, and any before it, are durable
            trainer.strategy.barrier("kontinue-stop")
            raise Preempted(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._mid_step = trainer.global_step == self._steps_seen  # no optimizer step in this batch
        if self._mid_step:
            return
        self._steps_seen = trainer.global_step
        stop, time_due, failure = self._vote.cast([self.stop_requested, self._time_due(), self._write_failure()])
        if failure:
            self._raise_write_failure(trainer, failure)
        self._stop_agreed = self._stop_agreed or bool(stop)
        steps_due = bool(self.every_n_steps and trainer.global_step % self.every_n_steps == 0)
        self._save_pending = self._save_pending or self._stop_agreed or bool(time_due) or steps_due
        # When a validation follows this step, the resume point waits until it is done. Lightning
        # does not resume correctly from a checkpoint taken on an epoch's last batch (the resumed
        # fit ends at once), so that save moves to the next step.
        if (self._save_pending and not validation_follows(trainer, batch_idx)
                and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
            self._save(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        # A stop asked for during the validation is acted on now in a single process; processes
        # agree on it at the next step's vote.
        self._stop_agreed = self._stop_agreed or (self.stop_requested and not self._vote.distributed)
        # A validation can fall between the batches of one accumulated step; gradients are not
        # part of a checkpoint, so the save then waits for the step to complete.
        # Lightning does not resume correctly from a checkpoint taken at an epoch's last
        # validation (the resumed fit ends early), so that save moves to the next step.
        if self._mid_step or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._save_pending = self._save_pending or self._stop_agreed or (
                not self._vote.distributed and self._time_due())
            return
        if self._save_pending or self._stop_agreed:
            self._save(trainer)


class BestModel(pl.Callback):
    """Keeps model.ckpt at the best validation score so far (AutoMM's model.ckpt), written by the
    background writer (before any resume point taken after it) while training goes on."""

    def __init__(self, run_dir: "RunDirectory", writer: BackgroundWriter, higher_is_better: bool):
        self.run_dir, self.writer = run_dir, writer
        self.higher_is_better = higher_is_better
        self.best_score: float | None = None
        self.best_step = -1

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score, self.best_step = state_dict["best_score"], state_dict["best_step"]

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        score = pl_module.last_validation[pl_module.problem.eval_metric]
        better = self.best_score is None or (score > self.best_score if self.higher_is_better
                                             else score < self.best_score)
        if better and np.isfinite(score):
            self.best_score, self.best_step = score, trainer.global_step
            if trainer.is_global_zero:
                best = self.writer.snapshot({"state_dict": pl_module.state_dict(), "score": score, "step": trainer.global_step,
                                 "metrics": dict(pl_module.last_validation)})
                self.writer.submit(lambda: self.run_dir.write_best_model(best), f"model.ckpt (step {best['step']})")
        if trainer.state.fn != "fit":  # Trainer.validate after a fit: its caller reads model.ckpt next
            self.writer.flush()


class TopKCandidates(pl.Callback):
    """Keeps the `top_k` best validated states as candidates for model.ckpt (AutoMM's optim.top_k),
    each written once by the background writer; the soup of them is made when training ends
    (kontinue.trainer.soup). The list travels in every resume point, and last.json names the
    candidates each point needs, so a resumed run finds the same ones."""

    def __init__(self, run_dir: "RunDirectory", writer: BackgroundWriter, higher_is_better: bool, top_k: int):
        self.run_dir, self.writer = run_dir, writer
        self.higher_is_better, self.top_k = higher_is_better, top_k
        self.candidates: list[dict[str, Any]] = []  # best first: {"key", "step", "score"}

    def _ranks_before(self, score: float, other: float) -> bool:
        return score > other if self.higher_is_better else score < other

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        score, step = pl_module.last_validation[pl_module.problem.eval_metric], trainer.global_step
        if not np.isfinite(score) or any(c["step"] == step for c in self.candidates):
            return  # a second validation within one accumulated step sees the same weights
        if len(self.candidates) >= self.top_k and not self._ranks_before(score, self.candidates[-1]["score"]):
            return
        candidate = {"key": self.run_dir.candidate_key(step), "step": step, "score": float(score)}
        place = next((i for i, c in enumerate(self.candidates) if self._ranks_before(score, c["score"])),
                     len(self.candidates))
        self.candidates = (self.candidates[:place] + [candidate] + self.candidates[place:])[:self.top_k]
        if trainer.is_global_zero:  # what drops out is deleted once no kept resume point needs it
            state = self.writer.snapshot({"state_dict": pl_module.state_dict(), "score": candidate["score"], "step": step})
            self.writer.submit(lambda: self.run_dir.write_candidate(candidate["key"], state),
                               f"candidate {candidate['key']}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint[CANDIDATES_FIELD] = [dict(candidate) for candidate in self.candidates]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        self.candidates = [dict(candidate) for candidate in checkpoint.get(CANDIDATES_FIELD, [])]


class StatusReporter(pl.Callback):
    """Keeps status.json (phase, progress, metrics) current for people and the operator."""

    def __init__(self, run_dir: "RunDirectory", every_n_seconds: float = 30.0):
        self.run_dir = run_dir
        self.every_n_seconds = every_n_seconds
        self._last_write = 0.0

    def _report(self, trainer, pl_module, **fields) -> None:
        if trainer.is_global_zero:
            self.run_dir.update_status(step=trainer.global_step, epoch=trainer.current_epoch,
                                       max_steps=pl_module.total_steps, **fields)
            self._last_write = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        """Each attempt is recorded with the steps it trained, so recomputed steps would show."""
        attempts = self.run_dir.status.setdefault("attempts", [])
        attempts.append({"started": now(), "fromStep": trainer.global_step})
        self._report(trainer, pl_module, phase="Running")

    def _end_attempt(self, trainer, pl_module, outcome: str, phase: str) -> None:
        attempts = self.run_dir.status.get("attempts")
        if attempts:
            attempts[-1].update(ended=now(), toStep=trainer.global_step, outcome=outcome)
        self._report(trainer, pl_module, phase=phase)

    def on_train_end(self, trainer, pl_module) -> None:
        self._end_attempt(trainer, pl_module, "completed", "Running")

    def on_exception(self, trainer, pl_module, exception) -> None:
        if isinstance(exception, Superseded):
            return  # the directory is a newer attempt's now: nothing more is written to it
        try:
            if isinstance(exception, Preempted):
                self._end_attempt(trainer, pl_module, "preempted", "Preempted")
            else:
                self._end_attempt(trainer, pl_module, f"failed: {type(exception).__name__}: {exception}", "Failed")
        except Superseded:
            pass  # found superseded while recording this end: the exception in flight still ends the fit

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if time.monotonic() - self._last_write >= self.every_n_seconds:
            self._report(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, metrics=pl_module.last_validation)
