"""The data order: reproducible per (seed, epoch), resumable mid-epoch, equal slices per rank."""

from __future__ import annotations

import itertools

import torch.distributed

from kontinue.trainer.data import ResumableBatchSampler


def test_a_resumed_sampler_yields_exactly_the_batches_that_were_left():
    sampler = ResumableBatchSampler(103, 8, seed=5)
    sampler.set_epoch(2)
    uninterrupted = list(sampler)
    sampler.set_epoch(2)
    first = list(itertools.islice(iter(sampler), 6))
    state = sampler.state_dict()
    assert state == {"epoch": 2, "consumed": 6}

    resumed = ResumableBatchSampler(103, 8, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert first + list(resumed) == uninterrupted
    resumed.set_epoch(3)  # the skip applies to the interrupted epoch only
    assert len(list(resumed)) == len(uninterrupted)


def test_epochs_and_seeds_shuffle_differently_and_reproducibly():
    def order(seed, epoch):
        sampler = ResumableBatchSampler(50, 10, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)
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
