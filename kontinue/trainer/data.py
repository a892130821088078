"""Tables in, batches out: reading data URIs and a data order that survives preemption."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterator

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kontinue.storage import open_store

TABLE_SUFFIXES = {".parquet": pd.read_parquet, ".pq": pd.read_parquet, ".csv": pd.read_csv}


def read_table(uri: str) -> pd.DataFrame:
    """Reads a parquet or CSV table from a path, `file://` or `s3://` URI."""
    suffix = Path(uri.split("?")[0]).suffix.lower()
    reader = TABLE_SUFFIXES.get(suffix)
    if reader is None:
        raise ValueError(f"{uri}: unsupported table format {suffix!r}; use one of {sorted(TABLE_SUFFIXES)}")
    parent, _, name = uri.rstrip("/").rpartition("/")
    store = open_store(parent or ".")
    local = store.local_path(name)
    if local is not None:
        return reader(local)
    with tempfile.TemporaryDirectory(prefix="kontinue-data-") as scratch:
        target = Path(scratch) / name
        store.get_file(name, target)
        return reader(target)


def as_table(data: pd.DataFrame | str | None) -> pd.DataFrame | None:
    """Accepts a DataFrame or a URI, like AutoMM accepts a DataFrame or a path."""
    if data is None or isinstance(data, pd.DataFrame):
        return data
    return read_table(str(data))


def table_fingerprint(frame: pd.DataFrame) -> str:
    """A cheap content hash: resuming on different data would break exact resume, so we warn."""
    return format(int(pd.util.hash_pandas_object(frame, index=False).sum()) & (2**64 - 1), "016x")


class ResumableBatchSampler(Sampler[list[int]]):
    """Shuffles by (seed, epoch) with its own generator and can start mid-epoch.

    Its state is the epoch and how many batches of it were trained, so a resumed run sees
    exactly the batches an uninterrupted run would have seen next. With several processes
    each rank takes its own slice of every global batch.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, shuffle: bool = True, world_size: int = 1):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.world_size = world_size
        self.epoch = 0
        self.consumed = 0
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

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
        self._skip = None
        # The rank is asked for here: loaders are built before Lightning starts the process group.
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        for self.consumed, batch in enumerate(self._global_batches()[start:], start=start + 1):
            yield batch[rank::self.world_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = (state["epoch"], state["consumed"])


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as stateful, so its position is part of every checkpoint."""

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


class EncodedDataset(Dataset):
    """Rows already turned into model inputs; encoding once up front keeps steps cheap."""

    def __init__(self, features: list[dict[str, Any]], targets: torch.Tensor | None):
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.features[index])
        item["index"] = index
        if self.targets is not None:
            item["target"] = self.targets[index]
        return item
