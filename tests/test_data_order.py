"""The data order: reproducible per (seed, epoch), resumable mid-epoch, equal slices per rank."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed

from kontinue.trainer.data import ResumableBatchSampler, ResumableDataLoader, sample_seed


class Keys(torch.utils.data.Dataset):
    """Each item is the (row, epoch) key the sampler gave."""

    def __len__(self):
        return 103

    def __getitem__(self, key):
        return torch.tensor(key)


def loader(workers: int = 0) -> ResumableDataLoader:
    return ResumableDataLoader(Keys(), batch_sampler=ResumableBatchSampler(103, 8, seed=5), num_workers=workers)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_yields_exactly_the_batches_that_were_left(workers):
    """The position is what the loader handed out, not what its workers fetched ahead."""
    first = loader(workers)
    first.batch_sampler.set_epoch(2)
    uninterrupted = [batch.tolist() for batch in first]
    first.batch_sampler.set_epoch(2)
    taken = [batch.tolist() for batch in itertools.islice(iter(first), 6)]
    state = first.state_dict()
    assert state == {"epoch": 2, "consumed": 6}

    resumed = loader(workers)
    resumed.load_state_dict(state)
    resumed.batch_sampler.set_epoch(2)
    assert taken + [batch.tolist() for batch in resumed] == uninterrupted
    assert all(epoch == 2 for batch in uninterrupted for _, epoch in batch)
    resumed.batch_sampler.set_epoch(3)  # the skip applies to the interrupted epoch only
    assert len(list(resumed)) == len(uninterrupted)


def test_a_samples_seed_depends_on_run_seed_epoch_and_row_only():
    seeds = {sample_seed(seed, epoch, row) for seed in (0, 1) for epoch in (0, 1) for row in (0, 1, 2)}
    assert len(seeds) == 12 and sample_seed(3, 4, 5) == sample_seed(3, 4, 5)


def test_epochs_and_seeds_shuffle_differently_and_reproducibly():
    def order(seed, epoch):
        sampler = ResumableBatchSampler(50, 10, seed=seed)
        sampler.set_epoch(epoch)
        return [[index for index, _ in batch] for batch in sampler]
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1) and order(1, 0) != order(2, 0)
    assert sorted(i for batch in order(1, 0) for i in batch) == list(range(50))


def test_every_rank_gets_a_slice_of_the_same_size():
    assert not torch.distributed.is_initialized()
    for size, batch, world in [(10, 2, 3), (7, 4, 2), (5, 1, 4)]:
        batches = ResumableBatchSampler(size, batch, seed=0, world_size=world)._global_batches()
        assert all(len(b) % world == 0 for b in batches)
        assert set(i for b in batches for i in b) == set(range(size))
        slices = [[b[rank::world] for b in batches] for rank in range(world)]
        assert len({tuple(len(s) for s in rank_slices) for rank_slices in slices}) == 1
