"""Tables in, batches out: reading data URIs and a data order that survives preemption."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kontinue.storage import open_store
from kontinue.trainer.backbones import seeded

def coco_table(annotations: dict[str, Any], images_uri: str) -> pd.DataFrame:
    """A COCO detection file as AutoMM's detection table: image (its path or URI, resolved against
    `images_uri`) and rois ([[x1, y1, x2, y2, category name], ...])."""
    names = {category["id"]: category["name"] for category in annotations.get("categories", [])}
    boxes: dict[Any, list[list[Any]]] = {image["id"]: [] for image in annotations.get("images", [])}
    for annotation in annotations.get("annotations", []):
        x, y, width, height = annotation["bbox"]
        boxes.setdefault(annotation["image_id"], []).append(
            [x, y, x + width, y + height, names.get(annotation["category_id"], annotation["category_id"])])
    base = images_uri.rstrip("/")
    return pd.DataFrame({"image": [image["file_name"] if "://" in image["file_name"] or image["file_name"].startswith("/")
                                   else f"{base}/{image['file_name']}" for image in annotations["images"]],
                         "rois": [boxes[image["id"]] for image in annotations["images"]]})


def _read_coco(path: Path, uri: str) -> pd.DataFrame:
    """Images are named relative to the file's folder (or its parent, COCO's annotations/ layout)."""
    annotations = json.loads(Path(path).read_text())
    folder = uri.rsplit("/", 1)[0] if "/" in uri else "."
    if "://" not in uri:
        first = (annotations.get("images") or [{}])[0].get("file_name", "")
        if first and not (Path(folder) / first).exists() and (Path(folder).parent / first).exists():
            folder = str(Path(folder).parent)
        folder = str(Path(folder).absolute())
    return coco_table(annotations, folder)


TABLE_SUFFIXES = {".parquet": lambda path, uri: pd.read_parquet(path), ".pq": lambda path, uri: pd.read_parquet(path),
                  ".csv": lambda path, uri: pd.read_csv(path), ".json": _read_coco}


def read_table(uri: str) -> pd.DataFrame:
    """Reads a parquet or CSV table, or a COCO detection file, from a path, `file://` or `s3://` URI."""
    suffix = Path(uri.split("?")[0]).suffix.lower()
    reader = TABLE_SUFFIXES.get(suffix)
    if reader is None:
        raise ValueError(f"{uri}: unsupported table format {suffix!r}; use one of {sorted(TABLE_SUFFIXES)}")
    parent, _, name = uri.rstrip("/").rpartition("/")
    store = open_store(parent or ".")
    local = store.local_path(name)
    if local is not None:
        return reader(local, str(local) if "://" not in uri else uri)
    with tempfile.TemporaryDirectory(prefix="kontinue-data-") as scratch:
        target = Path(scratch) / name
        store.get_file(name, target)
        return reader(target, uri)


def as_table(data: pd.DataFrame | str | None) -> pd.DataFrame | None:
    """Accepts a DataFrame or a URI, like AutoMM accepts a DataFrame or a path."""
    if data is None or isinstance(data, pd.DataFrame):
        return data
    return read_table(str(data))


def table_fingerprint(frame: pd.DataFrame) -> str:
    """A cheap content hash: resuming on different data would break exact resume, so we warn."""
    def hashable(column: pd.Series) -> pd.Series:  # lists of boxes, arrays from parquet: by their text
        if column.dtype == object and column.map(lambda v: isinstance(v, (list, dict, np.ndarray))).any():
            return column.map(lambda v: repr(v.tolist() if isinstance(v, np.ndarray) else v))
        return column

    frame = frame.apply(hashable)
    return format(int(pd.util.hash_pandas_object(frame, index=False).sum()) & (2**64 - 1), "016x")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of one sample's augmentation: a function of (run seed, epoch, row) only."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index & (2**63 - 1)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffles by (seed, epoch) with its own generator and can start mid-epoch.

    Yields (row, epoch) pairs, so a row's augmentation can be seeded by the epoch it is seen in.
    It skips the batches a restored loader state says were trained, so a resumed run sees exactly
    the batches an uninterrupted run would have seen next. With several processes each rank takes
    its own slice of every global batch.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, shuffle: bool = True, world_size: int = 1):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.world_size = world_size
        self.epoch = 0
        self.start = 0  # batches of this epoch skipped by the running iteration
        self._skip: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        step = self.batch_size * self.world_size
        # Every rank must get a slice of the same size (DDP gathers them), so a short last batch
        # is topped up with the first samples; validation drops the repeats by index.
        return [batch + order[:-len(batch) % self.world_size]
                for batch in (order[start:start + step] for start in range(0, self.size, step))]

    def __len__(self) -> int:
        return -(-self.size // (self.batch_size * self.world_size))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        self.start = self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0
        return self._batches(self.start, self.epoch)

    def _batches(self, start: int, epoch: int) -> Iterator[list[tuple[int, int]]]:
        # The skip is spent once batches are drawn: a multi-process DataLoader asks for an iterator
        # twice and discards the first without drawing from it.
        self._skip = None
        # The rank is asked for here: loaders are built before Lightning starts the process group.
        # A loader for one process (evaluate, predict after a DDP fit) takes every sample on any rank.
        rank = torch.distributed.get_rank() if self.world_size > 1 and torch.distributed.is_initialized() else 0
        for batch in self._global_batches()[start:]:
            yield [(index, epoch) for index in batch[rank::self.world_size]]

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = (state["epoch"], state["consumed"])


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as stateful, so its position is part of every checkpoint.

    The position counts the batches this loader handed to the training loop, not the ones its
    sampler produced: worker processes fetch batches ahead, and those are not trained yet.
    """

    batch_sampler: ResumableBatchSampler

    def __iter__(self) -> Iterator[Any]:
        batches = super().__iter__()  # asks the sampler for its iterator, which fixes `start`
        self._epoch, self._delivered = self.batch_sampler.epoch, self.batch_sampler.start
        for batch in batches:
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self, "_epoch", self.batch_sampler.epoch),
                "consumed": getattr(self, "_delivered", 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


class RowDataset(Dataset):
    """Rows as each backbone's processor prepared them; `transform` runs per item (in the workers),
    under RNG states seeded by (seed, epoch, row) when training, so augmentation is reproducible."""

    def __init__(self, rows: dict[str, list[dict[str, Any]]], processors: dict[str, Any],
                 targets: torch.Tensor | None, *, seed: int, training: bool):
        self.rows, self.processors, self.targets = rows, processors, targets
        self.seed, self.training = seed, training
        self.size = len(next(iter(rows.values()))) if rows else 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        item: dict[str, Any] = {"index": index}
        with seeded(sample_seed(self.seed, epoch, index) if self.training else None):
            for name, processor in self.processors.items():
                item[name] = processor.transform(self.rows[name][index], training=self.training)
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item


class Collate:
    """Batches items: each backbone's processor collates its own part."""

    def __init__(self, processors: dict[str, Any], collate_targets: Callable[[list[Any]], Any] | None):
        self.processors, self.collate_targets = processors, collate_targets

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {"index": torch.tensor([item["index"] for item in items])}
        for name, processor in self.processors.items():
            batch.update(processor.collate([item[name] for item in items]))
        if self.collate_targets is not None:
            batch["target"] = self.collate_targets([item["target"] for item in items])
        return batch
