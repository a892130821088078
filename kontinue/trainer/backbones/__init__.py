"""Backbones by AutoMM prefix: one name, one builder (the timm `create_model` idea).

A backbone owns its modality end to end: the columns it claims, how a row is read and
transformed (in the data-loader workers), how a batch is collated, its forward pass to one
feature vector per row, what it saves before the first step, and its dump format. Families are
listed, with the problem types they serve, in `kontinue.api.families` (no torch needed there);
each family's module registers its builder here when imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Iterator

import pandas as pd
import torch
from torch import nn

from kontinue.api.contract import InvalidInput
from kontinue.api.families import family_of, missing_install
from kontinue.trainer.optimization import encoder_layer_ids

BUILDERS: dict[str, type["Backbone"]] = {}


def register_backbone(family: str):
    def wrap(builder: type["Backbone"]) -> type["Backbone"]:
        BUILDERS[family] = builder
        builder.family = family
        return builder
    return wrap


def builder_for(name: str) -> type["Backbone"]:
    """The builder of model name `name` (timm_image_1 is a second timm_image)."""
    family = family_of(name)
    if family is None:
        raise InvalidInput("hyperparameters.model.names", f"{name!r} is not a model family this trainer runs")
    problem = missing_install(name)
    if problem:
        raise InvalidInput("hyperparameters.model.names", problem)
    importlib.import_module(family.module)
    return BUILDERS[family.prefix]


def create_backbone(name: str, hyperparameters: dict[str, Any], columns: list[str], *, problem: Any,
                    data: pd.DataFrame | None = None, assets_dir: Path | None = None) -> "Backbone":
    """Builds backbone `name` over `columns`: new from its checkpoint_name and the training `data`,
    or, with `assets_dir`, its architecture from saved assets (the weights then come from a checkpoint).
    A detector also needs the `problem` (its classes); other families ignore it."""
    builder = builder_for(name)
    return builder(name, builder.options_from(hyperparameters, name), columns, data=data, assets_dir=assets_dir,
                   problem=problem)


class Processor:
    """The data side of a backbone: `prepare` runs once in the main process; `transform` and
    `collate` run in the data-loader workers, so a processor holds no weights."""

    def __init__(self, prefix: str, columns: list[str]):
        self.prefix, self.columns = prefix, list(columns)

    def key(self, name: str) -> str:
        """A batch key of this backbone's; names are prefixed so backbones never collide."""
        return f"{self.prefix}_{name}"

    def check_columns(self, data: pd.DataFrame) -> None:
        missing = [name for name in self.columns if name not in data.columns]
        if missing:
            raise InvalidInput("data", f"column(s) {missing} that {self.prefix} was trained on are missing")

    def prepare(self, data: pd.DataFrame) -> list[dict[str, Any]]:
        """Per-row inputs computed once up front, cheap to keep in memory (tokens, paths, values)."""
        raise NotImplementedError

    def transform(self, row: dict[str, Any], *, training: bool) -> dict[str, Any]:
        """Per-row work in the workers (reading, augmenting images). Randomness comes from the
        global RNGs, which the dataset seeds per sample (see `seeded`)."""
        return row

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Backbone(nn.Module):
    """Turns a batch of rows into one feature vector per row."""

    family: ClassVar[str]
    modality: ClassVar[str]
    Options: ClassVar[type]  # a dataclass of the family's model.<family>.* hyperparameters
    processor: Processor
    out_features: int

    def __init__(self, name: str, options: Any):
        super().__init__()
        self.prefix, self.options = name, options

    @classmethod
    def options_from(cls, hyperparameters: dict[str, Any], name: str) -> Any:
        """The family's own typed options: model.<name or family>.<field> for each field of `Options`."""
        values = {}
        for option in dataclasses.fields(cls.Options):
            for key in (f"model.{name}.{option.name}", f"model.{cls.family}.{option.name}"):
                if key in hyperparameters:
                    value = hyperparameters[key]
                    values[option.name] = tuple(value) if isinstance(value, list) else value
                    break
        return cls.Options(**values)

    @property
    def columns(self) -> list[str]:
        return self.processor.columns

    #: Whether the head over this family alone starts Xavier-uniform, as AutoMM's (its hf_text and
    #: tabular heads do; its timm_image head keeps torch's default initialisation).
    xavier_head: ClassVar[bool] = True

    #: AutoMM's layer-id rule for layer-wise learning-rate decay: (the pretrained model's attribute,
    #: name parts before its encoder, name parts after it); None: nothing here is pretrained.
    layer_rule: ClassVar[tuple[str, tuple[str, ...], tuple[str, ...]] | None] = None

    def layer_ids(self) -> dict[str, int]:
        """Each parameter's layer id, counted from the output end (see kontinue.trainer.optimization)."""
        names = [name for name, _ in self.named_parameters()]
        return encoder_layer_ids(names, *self.layer_rule) if self.layer_rule else dict.fromkeys(names, 0)

    def save_assets(self, directory: Path) -> None:
        """Writes what rebuilding this backbone needs without its original checkpoint."""
        raise NotImplementedError

    def dump(self, directory: Path) -> None:
        """Writes the trained backbone in its library's own format (AutoMM's dump_model)."""
        raise NotImplementedError(f"{self.family} is not dumped (as in AutoMM)")


def resolve_checkpoint_name(name: str) -> str:
    """A dumped folder as a local directory: an `s3://` URI is fetched into a local cache,
    a `file://` URI or a path is used in place; anything else stays a name (an architecture)."""
    if name.startswith("s3://"):
        return str(_fetched(name))
    if name.startswith("file://"):
        name = name[len("file://"):]
    expanded = os.path.expanduser(name)
    return expanded if os.path.isdir(expanded) else name


def _fetched(uri: str) -> Path:
    """The objects under `uri` in a local folder, cached under their listing (keys, sizes, digests,
    times): a dump written again to the same URI is fetched again, never a stale copy. The folder
    appears whole or not at all, so a fetch cut short is never taken for a complete one."""
    from kontinue.storage import open_store

    store = open_store(uri)
    listing = sorted((info.key, info.size, info.sha256, info.modified) for info in store.list(""))
    if not listing:
        raise InvalidInput("hyperparameters.model.*.checkpoint_name", f"{uri} holds no files")
    cache = Path(tempfile.gettempdir()) / "kontinue-checkpoints"
    local = cache / hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:32]
    if not local.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=cache, prefix=".partial-"))
        try:
            store.sync_down(partial)
            partial.rename(local)
        except OSError:
            if not local.is_dir():  # else another process fetched the same objects first
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return local


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Runs a block on RNG states derived from `seed` alone and puts the caller's back after it, so a
    sample's augmentation depends on (run seed, epoch, index) only, not on which worker made it."""
    if seed is None:
        yield
        return
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU's only: torch.manual_seed would reseed CUDA's too
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
