"""Trainer assembly: devices and precision, the callbacks in their order, and the final state's
fingerprint. The Lightning Trainer owns the loop."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping

from kontinue.trainer.callbacks import BestModel, RandomState, ResumePoints, StatusReporter
from kontinue.trainer.checkpoint_io import BackgroundWriter, ResumePointIO
from kontinue.trainer.problem import Problem
from kontinue.trainer.rundir import RunDirectory


def devices(hp: dict[str, Any]) -> tuple[str, int | str, str, str]:
    """Every visible GPU (DDP across them, bf16 where supported), else the CPU."""
    available = torch.cuda.device_count()
    wanted = available if hp["env.num_gpus"] < 0 else min(available, hp["env.num_gpus"])
    precision = str(hp["env.precision"])
    if wanted == 0:
        return "cpu", 1, "auto", "32-true" if precision == "auto" else precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "gpu", wanted, "ddp" if wanted > 1 else "auto", precision


def build_trainer(hp: dict[str, Any], run_dir: RunDirectory, problem: Problem, *, accumulate: int,
                  time_limit: float | None, progress_bar: bool) -> pl.Trainer:
    accelerator, device_count, strategy, precision = devices(hp)
    interval = hp["optim.val_check_interval"]
    writer = BackgroundWriter()
    run_dir.keep = hp["env.checkpoint_keep"]
    callbacks = [
        RandomState(),
        BestModel(run_dir, writer, problem.higher_is_better),
        StatusReporter(run_dir),
        EarlyStopping(monitor="val_score", mode="max" if problem.higher_is_better else "min",
                      patience=hp["optim.patience"], check_on_train_epoch_end=False),
        # Last: a resume point taken at a validation must hold what the callbacks above made of it
        # (else a resumed run forgets that validation's best model), and an attempt stopped at its
        # first resume point must already be recorded in status.json.
        ResumePoints(run_dir, writer, hp["env.checkpoint_every_n_steps"], hp["env.checkpoint_every_n_minutes"]),
    ]
    return pl.Trainer(
        accelerator=accelerator, devices=device_count, strategy=strategy, precision=precision,
        max_epochs=hp["optim.max_epochs"], max_steps=hp["optim.max_steps"],
        max_time=dt.timedelta(seconds=time_limit) if time_limit else None,
        accumulate_grad_batches=accumulate, gradient_clip_val=hp["optim.gradient_clip_val"] or None,
        val_check_interval=min(1.0, interval) if interval <= 1 else int(interval),
        callbacks=callbacks, plugins=[ResumePointIO(run_dir, writer)], logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
        enable_progress_bar=progress_bar, enable_model_summary=False,
        use_distributed_sampler=False, default_root_dir=str(run_dir.path),
    )


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
