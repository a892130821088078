"""An AutoMM-MultiModalPredictor-shaped predictor whose runs survive preemption exactly.

The Predictor is the user-facing API only: which models are built is `model`, how the Lightning
Trainer is assembled is `fitting`, batches come from `data`, what state a run directory is in is
`RunDirectory.state`, and the files are `rundir`'s.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from kontinue.api.contract import InvalidInput
from kontinue.api.families import OBJECT_DETECTION, family_of
from kontinue.api.hyperparameters import stored_hyperparameters, validate_hyperparameters
from kontinue.storage import ChecksumMismatch, ObjectNotFound
from kontinue.trainer.callbacks import TopKCandidates
from kontinue.trainer.columns import column_roles
from kontinue.trainer.data import (Collate, ResumableBatchSampler, ResumableDataLoader, RowDataset, as_table,
                                   table_fingerprint)
from kontinue.trainer.fitting import build_trainer, devices, end_processes, process_rank, state_fingerprint
from kontinue.trainer.model import build_module, rebuild_module, save_assets, select_models
from kontinue.trainer.module import PredictorModule
from kontinue.trainer.problem import Problem
from kontinue.trainer.rundir import COMPLETED, EMPTY, UNSTARTED, RunDirectory, now
from kontinue.trainer.soup import make_soup

log = logging.getLogger("kontinue.trainer")
FORMAT_VERSION = 2  # 2: column roles, several families; version 1 directories (hf_text only) still load


def _default_path() -> Path:
    return Path("KontinueModels") / dt.datetime.now().strftime("kt-%Y%m%d_%H%M%S_%f")


class Predictor:
    """fit / evaluate / predict / load(resume=True) / dump_model, as in AutoGluon's AutoMM.

    Everything `load(resume=True)` needs is written before the first training step, and the
    resume point is taken on SIGTERM, so a run killed at any instant can be continued.
    """

    def __init__(self, label: str | None = None, problem_type: str | None = None,
                 eval_metric: str | None = None, path: str | Path | None = None,
                 hyperparameters: dict[str, Any] | None = None, verbosity: int = 2,
                 enable_progress_bar: bool | None = None, run_dir: RunDirectory | None = None):
        self.label, self.problem_type, self.eval_metric = label, problem_type, eval_metric
        self.hyperparameters = dict(hyperparameters or {})
        validate_hyperparameters(self.hyperparameters)
        self.verbosity = verbosity
        self.enable_progress_bar = enable_progress_bar
        self._run_dir = run_dir or (RunDirectory(path) if path is not None else None)
        self._problem: Problem | None = None
        self._module: PredictorModule | None = None
        self._metadata: dict[str, Any] | None = None
        self._resume = False
        self.fit_summary: dict[str, Any] = {}

    # -- paths -------------------------------------------------------------------------------------
    @property
    def path(self) -> str | None:
        return str(self._run_dir.path) if self._run_dir else None

    @property
    def run_dir(self) -> RunDirectory:
        if self._run_dir is None:
            self._run_dir = RunDirectory(_default_path())
        return self._run_dir

    def use_run_directory(self, run_dir: RunDirectory) -> None:
        """Where the next fit writes: a TrainingRun's run directory instead of a path."""
        self._run_dir = run_dir

    @property
    def is_main_process(self) -> bool:
        """False in the other ranks of a DDP fit (Lightning runs the script once more per rank): they
        write nothing, and only rank 0 finishes a fit (best weights, status.json), so only it should
        evaluate, dump or save afterwards."""
        return process_rank() == 0

    @property
    def problem(self) -> Problem:
        if self._problem is None or self._module is None:
            raise RuntimeError("the predictor is not fitted yet; call fit() or Predictor.load()")
        return self._problem

    @property
    def class_labels(self) -> list[Any] | None:
        return self.problem.classes or None

    @property
    def column_types(self) -> dict[str, str]:
        """The role of each column the models use (AutoMM's column types)."""
        self.problem  # noqa: B018 -- "not fitted yet"
        return dict(self._metadata.get("column_roles") or {})

    # -- fit -----------------------------------------------------------------------------------------
    def fit(self, train_data: pd.DataFrame | str, tuning_data: pd.DataFrame | str | None = None,
            time_limit: float | None = None, hyperparameters: dict[str, Any] | None = None,
            seed: int = 0, holdout_frac: float = 0.1, column_types: dict[str, str] | None = None) -> "Predictor":
        train_data, tuning_data = as_table(train_data), as_table(tuning_data)
        if self._resume:
            return self._fit_resumed(train_data, tuning_data, time_limit)
        continuing = self._module is not None  # AutoMM use case 1: keep training a fitted predictor
        state = self.run_dir.state()
        if state == UNSTARTED:
            # also a continueFrom run retried after dying before its first resume point: it
            # starts over in its own run directory, not in a new path (and how a DDP fit's other
            # ranks find the directory rank 0 has just set up)
            if self.is_main_process:
                log.info("%s holds a run that never saved a step; starting it over", self.path)
        elif state != EMPTY and continuing:
            log.info("continuing from the fitted weights of %s into a new path", self.path)
            self._run_dir = RunDirectory(_default_path())
        elif state != EMPTY:
            raise InvalidInput("path", f"{self.path} already holds a predictor; use Predictor.load(path, "
                               "resume=True) to continue it, or choose a new path")
        if self.label is None and self.problem_type == OBJECT_DETECTION:  # AutoMM's detection tables
            self.label = "rois" if "rois" in train_data.columns else "label"
        if self.label is None:
            raise InvalidInput("label", "the predictor needs the name of the label column")
        base = self._metadata["hyperparameters"] if continuing else self.hyperparameters
        hp = validate_hyperparameters({**base, **(hyperparameters or {})})
        pl.seed_everything(seed, workers=True, verbose=False)
        if continuing:
            problem, module = self.problem, self._module
            columns, roles = self._metadata["columns"], self._metadata.get("column_roles")
            problem.encode(train_data[self.label])  # the classes must be the ones it was trained on
            module.hyperparameters = hp
        else:
            problem = Problem.from_data(self.label, train_data, self.problem_type, self.eval_metric)
            roles = column_roles(train_data, [self.label], column_types)
            columns = select_models(hp["model.names"], roles, problem.problem_type)
            module = build_module(hp, problem, columns, train_data)
        if tuning_data is None:
            tuning_data = train_data.sample(frac=holdout_frac, random_state=seed)
            train_data = train_data.drop(tuning_data.index)
        self._problem, self._module = problem, module
        self._metadata = {
            "version": FORMAT_VERSION, "label": self.label, "problem": problem.to_dict(),
            "hyperparameters": hp, "columns": columns, "column_roles": roles, "seed": seed,
            "time_limit": time_limit, "holdout_frac": holdout_frac,
            "data_fingerprint": table_fingerprint(train_data), "created": now(),
            "continued": continuing,  # its starting weights are another predictor's, not checkpoint_name's
        }
        if self.is_main_process:
            save_assets(module, self.run_dir.path / "assets")
            self.run_dir.write_metadata(self._metadata)
            self.run_dir.update_status(phase="Pending", started=now())
        return self._train(train_data, tuning_data, time_limit, ckpt_path=None)

    def _fit_resumed(self, train_data, tuning_data, time_limit) -> "Predictor":
        metadata = self._metadata
        self._resume = False
        if self.run_dir.state() == UNSTARTED:
            # Stopped before its first resume point (killed during set-up): nothing was trained.
            if metadata.get("continued"):
                raise FileNotFoundError(
                    f"path: {self.run_dir.uri} was stopped before its first resume point, and the fitted weights "
                    "it continued from are not stored there; continue the original predictor again")
            log.info("%s was stopped before its first resume point; starting it over", self.run_dir.uri)
            self._module, self.hyperparameters = None, dict(metadata["hyperparameters"])
            return self.fit(train_data, tuning_data, time_limit=time_limit or metadata["time_limit"],
                            seed=metadata["seed"], holdout_frac=metadata["holdout_frac"],
                            column_types=metadata.get("column_roles"))
        if tuning_data is None:  # the same hold-out as the first attempt
            tuning_data = train_data.sample(frac=metadata["holdout_frac"], random_state=metadata["seed"])
            train_data = train_data.drop(tuning_data.index)
        if table_fingerprint(train_data) != metadata["data_fingerprint"]:
            (self.run_dir.warn if self.is_main_process else log.warning)(
                "the training data differs from the data this run started with; "
                "the resumed run will not match an uninterrupted one")
        ckpt_path = self.run_dir.find_resume_point()
        if ckpt_path is None:
            raise FileNotFoundError(
                f"path: no valid checkpoint is left in {self.run_dir.uri} (see the warnings in status.json); "
                "refusing to silently restart from the first step. Start a new run to train from scratch.")
        pl.seed_everything(metadata["seed"], workers=True, verbose=False)
        return self._train(train_data, tuning_data, time_limit or metadata["time_limit"], ckpt_path=ckpt_path)

    def _train(self, train_data, tuning_data, time_limit, ckpt_path) -> "Predictor":
        hp, problem, module = self._metadata["hyperparameters"], self.problem, self._module
        _, device_count, _, _ = devices(hp)
        world_size = device_count if isinstance(device_count, int) else 1
        per_device = int(hp["env.per_gpu_batch_size"])
        accumulate = max(1, int(hp["env.batch_size"]) // (per_device * world_size))
        train_loader = self._loader(train_data, training=True, batch_size=per_device, world_size=world_size)
        val_loader = self._loader(tuning_data, training=False, world_size=world_size,
                                  batch_size=per_device * hp["env.eval_batch_size_ratio"])
        steps_per_epoch = math.ceil(len(train_loader) / accumulate)
        total = steps_per_epoch * hp["optim.max_epochs"]
        module.total_steps = min(total, hp["optim.max_steps"]) if hp["optim.max_steps"] > 0 else total
        trainer = build_trainer(hp, self.run_dir, problem, accumulate=accumulate, time_limit=time_limit,
                                progress_bar=self._progress_bar())
        module.train()  # predict/evaluate leave it in eval mode, and Lightning does not switch it back
        try:
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt_path) if ckpt_path else None,
                        weights_only=True)
            self._finish(trainer, val_loader, tuning_data)
        finally:
            end_processes(trainer)  # rank 0 of a DDP fit ends after the other ranks
        return self

    def _finish(self, trainer: pl.Trainer, val_loader: DataLoader, tuning_data: pd.DataFrame) -> None:
        """After the fit, in every process: the validation of a run stopped before its first one is
        collective under DDP, so rank 0's finding is shared; the rest is rank 0's alone. The trained
        state is recorded before the resume points go: a process killed anywhere in here leaves a
        run directory that is either resumed or complete, never one that fails."""
        run_dir, module = self.run_dir, self._module
        final = {"step": trainer.global_step, "sha256": state_fingerprint(module, trainer.optimizers)} \
            if trainer.is_global_zero else None
        never_validated = not run_dir.has_best_model() if trainer.is_global_zero else None
        if trainer.strategy.broadcast(never_validated, src=0):  # stopped by the time limit before any validation
            trainer.validate(module, val_loader, verbose=False)
        if not trainer.is_global_zero:
            return  # another rank of a DDP fit: it ends here, writing nothing
        self._make_soup(trainer, tuning_data)
        best = run_dir.load_best_model()
        module.load_state_dict(best["state_dict"])
        self.fit_summary = {"best_score": best["score"], "best_step": best["step"],
                            "eval_metric": self.problem.eval_metric, "steps": trainer.global_step}
        run_dir.update_status(phase="Succeeded", step=trainer.global_step, finished=now(), finalState=final,
                              bestScore=best["score"], metrics=best["metrics"])
        run_dir.drop_resume_points()
        run_dir.update_status()  # without lastCheckpoint

    def _make_soup(self, trainer: pl.Trainer, tuning_data: pd.DataFrame) -> None:
        """model.ckpt becomes the soup of the top_k candidates (optim.top_k_average_method). A
        candidate that is gone or damaged is left out with a warning."""
        kept = next((c for c in trainer.callbacks if isinstance(c, TopKCandidates)), None)
        candidates, files = [], {}
        for candidate in kept.candidates if kept else []:
            try:
                files[candidate["key"]] = self.run_dir.fetch_candidate(candidate["key"])
                candidates.append(candidate)
            except (ObjectNotFound, ChecksumMismatch) as error:
                self.run_dir.warn(f"model candidate {candidate['key']} left out of the soup: {error}")
        if not candidates:
            return
        module, metric = self._module, self.problem.eval_metric

        def load(candidate: dict[str, Any]) -> dict[str, torch.Tensor]:
            return torch.load(files[candidate["key"]], map_location="cpu", weights_only=True)["state_dict"]

        def score(state: dict[str, torch.Tensor]) -> float:
            module.load_state_dict(state)
            return self.evaluate(tuning_data, metric)[metric]

        method = self._metadata["hyperparameters"]["optim.top_k_average_method"]
        soup = make_soup(candidates, method, load, score, self.problem.higher_is_better)
        log.info("model.ckpt: %s of the states of steps %s", method, soup.steps)
        if soup.steps == [candidates[0]["step"]] and self.run_dir.has_best_model():
            return  # the best alone: model.ckpt holds it already
        module.load_state_dict(soup.state)
        metrics = self.evaluate(tuning_data)
        self.run_dir.write_best_model({"state_dict": soup.state, "score": metrics[metric], "metrics": metrics,
                                       "step": candidates[0]["step"], "soup": {"method": method, "steps": soup.steps}})

    def _progress_bar(self) -> bool:
        return self.verbosity >= 2 if self.enable_progress_bar is None else self.enable_progress_bar

    def _loader(self, data: pd.DataFrame, *, training: bool, batch_size: int, world_size: int = 1,
                with_targets: bool = True) -> DataLoader:
        processors = {name: backbone.processor for name, backbone in self._module.backbones.items()}
        rows = {name: processor.prepare(data) for name, processor in processors.items()}
        targets = self.problem.encode(data[self.label]) if with_targets else None
        seed = self._metadata["seed"]
        dataset = RowDataset(rows, processors, targets, seed=seed, training=training)
        sampler = ResumableBatchSampler(len(data), batch_size, seed=seed, shuffle=training, world_size=world_size)
        collate = Collate(processors, self.problem.collate_targets if with_targets else None)
        return ResumableDataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                   num_workers=self._metadata["hyperparameters"]["env.num_workers"],
                                   generator=torch.Generator().manual_seed(seed))

    # -- inference -----------------------------------------------------------------------------------
    def _outputs(self, data: pd.DataFrame, with_targets: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.problem  # noqa: B018 -- "not fitted yet" rather than a TypeError below
        hp = self._metadata["hyperparameters"]
        loader = self._loader(data, training=False, with_targets=with_targets,
                              batch_size=hp["env.per_gpu_batch_size"] * hp["env.eval_batch_size_ratio"])
        device = torch.device("cuda" if torch.cuda.is_available() and hp["env.num_gpus"] != 0 else "cpu")
        module = self._module.to(device).eval()
        outputs, targets = [], []
        with torch.inference_mode():
            for batch in loader:
                on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                outputs.append(self.problem.outputs(module, on_device))
                if with_targets:
                    targets.append(batch["target"])
        merge = self.problem.merge
        return merge(outputs), merge(targets) if with_targets else None

    def evaluate(self, data: pd.DataFrame | str, metrics: list[str] | str | None = None) -> dict[str, float]:
        data = as_table(data)
        outputs, targets = self._outputs(data, with_targets=True)
        names = [metrics] if isinstance(metrics, str) else metrics
        return self.problem.score(outputs, targets, names or None)

    def predict(self, data: pd.DataFrame | str, as_pandas: bool = True) -> pd.Series | np.ndarray:
        data = as_table(data)
        outputs, _ = self._outputs(data, with_targets=False)
        values = self.problem.decode(outputs)
        return pd.Series(values, index=data.index, name=self.label) if as_pandas else values

    def predict_proba(self, data: pd.DataFrame | str, as_pandas: bool = True,
                      as_multiclass: bool = True) -> pd.DataFrame | np.ndarray:
        if not hasattr(self.problem, "probabilities"):
            raise InvalidInput("predict_proba", f"a {self.problem.problem_type} predictor has no class probabilities")
        data = as_table(data)
        outputs, _ = self._outputs(data, with_targets=False)
        probabilities = self.problem.probabilities(outputs).numpy()
        if not as_multiclass and self.problem.problem_type == "binary":
            probabilities = probabilities[:, 1]
            return pd.Series(probabilities, index=data.index) if as_pandas else probabilities
        return pd.DataFrame(probabilities, index=data.index, columns=self.problem.classes) if as_pandas \
            else probabilities

    # -- persistence --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, resume: bool = False, run_dir: RunDirectory | None = None) -> "Predictor":
        """Loads a predictor; resume=True continues an unfinished fit from its last valid checkpoint."""
        run_dir = run_dir or RunDirectory(path)
        metadata = run_dir.read_metadata()
        if metadata is None:
            raise FileNotFoundError(f"path: {run_dir.path} holds no kontinue predictor (kontinue.json missing)")
        problem = Problem.from_dict(metadata["problem"])
        predictor = cls(label=metadata["label"], problem_type=problem.problem_type,
                        eval_metric=problem.eval_metric, run_dir=run_dir)
        predictor._problem, predictor._metadata = problem, metadata
        hp = metadata["hyperparameters"] = stored_hyperparameters(metadata["hyperparameters"])
        predictor._module = rebuild_module(hp, problem, metadata["columns"], run_dir.path / "assets")
        state = run_dir.state()
        if resume:
            if state == COMPLETED:
                raise InvalidInput("path", f"training in {run_dir.path} is already completed; load it with "
                                   "resume=False")
            predictor._resume = True
        elif run_dir.has_best_model():
            predictor._module.load_state_dict(run_dir.load_best_model()["state_dict"])
        else:
            raise FileNotFoundError(f"path: {run_dir.path} has no model.ckpt yet; use resume=True to "
                                    "continue its training")
        return predictor

    def save(self, path: str | Path) -> None:
        """Copies the predictor (metadata, assets, best model) to `path`."""
        target = Path(path)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("kontinue.json", "status.json", "model.ckpt", "model.ckpt.sha256"):
            if (self.run_dir.path / name).exists():
                shutil.copy2(self.run_dir.path / name, target / name)
        shutil.copytree(self.run_dir.path / "assets", target / "assets", dirs_exist_ok=True)

    def dump_model(self, save_path: str | Path | None = None) -> str:
        """Writes each dumped backbone in its library's own format: `<save_path>/hf_text/`,
        `timm_image/`, ... (tabular towers and the fusion head are not dumped, as in AutoMM)."""
        self.problem  # noqa: B018 -- "not fitted yet" rather than an AttributeError below
        target = Path(save_path) if save_path else self.run_dir.path / "dump"
        # Written beside the target and moved into place: a dump stopped half-way is never seen.
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        for name, backbone in self._module.backbones.items():
            if family_of(name).dumped:
                backbone.dump(staging / name)
        staging.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        if target.absolute() == self.run_dir.path / "dump":  # a dump elsewhere leaves the run's status alone
            if self.run_dir.remote is not None:
                self.run_dir.remote.sync_up(target, "dump")
            self.run_dir.update_status(dumpedModel=f"{self.run_dir.uri.rstrip('/')}/dump")
        return str(target)
