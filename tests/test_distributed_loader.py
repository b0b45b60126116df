"""The torchrun loader rebuild keeps the user's loader, checked without starting processes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler, TensorDataset

from enginekit.distributed import shard_loader


def seed_worker(worker_id: int) -> None:  # module level: picklable
    pass


def dataset(n: int = 10) -> TensorDataset:
    x = torch.arange(n * 4).reshape(n, 4)
    return TensorDataset(x, x + 1)


def test_settings_are_kept_and_batch_shapes_unchanged():
    gen = torch.Generator().manual_seed(5)
    loader = DataLoader(
        dataset(),
        batch_size=3,
        shuffle=True,
        drop_last=True,
        num_workers=1,
        prefetch_factor=3,
        persistent_workers=True,
        timeout=7,
        worker_init_fn=seed_worker,
        generator=gen,
    )
    shard = shard_loader(loader, rank=1, world_size=2, seed=11)
    for attr in ("batch_size", "drop_last", "num_workers", "prefetch_factor", "persistent_workers", "timeout"):
        assert getattr(shard, attr) == getattr(loader, attr), attr
    assert shard.worker_init_fn is seed_worker and shard.generator is gen
    assert shard.sampler.shuffle and shard.sampler.seed == 11 and shard.sampler.rank == 1
    shapes = {tuple(x.shape) for x, _ in shard}
    assert shapes == {(3, 4)}  # drop_last still drops the short batch, as the user asked


def test_shards_are_disjoint_and_cover_the_data():
    loader = DataLoader(dataset(8), batch_size=2, shuffle=False)
    seen = [[int(row[0]) for x, _ in shard_loader(loader, r, 2, 0) for row in x] for r in (0, 1)]
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(0, 32, 4))
    assert not shard_loader(loader, 0, 2, 0).sampler.shuffle


class EveryOther(Sampler):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(range(0, self.n, 2))

    def __len__(self) -> int:
        return self.n // 2


class Pairs(BatchSampler):
    pass


@pytest.mark.parametrize(
    "loader, kind",
    [
        (lambda: DataLoader(dataset(), sampler=EveryOther(10), batch_size=2), "EveryOther"),
        (lambda: DataLoader(dataset(), batch_sampler=Pairs(SequentialSampler(range(10)), 2, False)), "Pairs"),
    ],
)
def test_a_custom_sampler_is_refused_with_how_to_shard_it(loader, kind):
    with pytest.raises(
        ValueError, match=f"cannot shard a DataLoader with a custom {kind}: give it a DistributedSampler"
    ):
        shard_loader(loader(), 0, 2, 0)


def test_not_a_dataloader_is_refused():
    with pytest.raises(ValueError, match="got list: pass a DataLoader"):
        shard_loader([1, 2], 0, 2, 0)
