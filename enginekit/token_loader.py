"""Batches of a prepared corpus: a seeded O(1)-memory shuffle, sharded by rank, resumable in O(1).

The shuffle is a keyed bijection of the window index (a Feistel network, :class:`IndexPermutation`),
so the loader holds no per-window objects or arrays; :class:`TokenLoader`'s ``state_dict()`` is
``{"epoch", "position", ...}`` and the engine stores it in checkpoints. The windows themselves
come from :class:`~enginekit.corpus.TokenDataset`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from .corpus import CorpusError, TokenDataset

__all__ = ["IndexPermutation", "TokenLoader", "corpus_loaders"]


# ---------------------------------------------------------------------------------------------- shuffling

_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64's finalizer: a cheap, well-spread 64-bit hash."""
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class IndexPermutation:
    """A seeded permutation of ``range(n)`` computed one index at a time, in O(1) memory.

    A 4-round Feistel network on the smallest power of two >= n (unbalanced halves, so the
    domain is < 2n), with cycle walking: values >= n are encrypted again until they fall in
    range, which keeps it a bijection on ``range(n)``; on average fewer than 2 passes. The round
    function is multiply-shift hashing (the top bits of ``(right ^ key) * odd`` mod 2^64), one
    multiplication, so an index costs about a microsecond in Python. Memory is a few ints
    whatever ``n`` (``torch.randperm(n)`` would take 8 bytes per window: 4 GB for 500M windows
    at stride 1).
    """

    ROUNDS = 4
    _ODD = 0x9E3779B97F4A7C15

    def __init__(self, n: int, seed: int, epoch: int = 0) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self._left, self._right = bits // 2, bits - bits // 2
        base = _mix64(_mix64(seed & _M64) ^ _mix64((epoch + 1) & _M64))
        # each round: (key, bits of the half it writes); the halves alternate between a and b bits
        widths = [self._left if r % 2 == 0 else self._right for r in range(self.ROUNDS)]
        self._rounds = [(_mix64(base + r), 64 - w) for r, w in enumerate(widths)]

    def _encrypt(self, x: int) -> int:
        b = self._right  # x = left << b | right: left of a bits, right of b bits
        left, right = x >> b, x & ((1 << b) - 1)
        for key, shift in self._rounds:
            left, right = right, left ^ ((((right ^ key) * self._ODD) & _M64) >> shift)
        return (left << b) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a permutation of {self.n}")
        x = self._encrypt(i)
        while x >= self.n:
            x = self._encrypt(x)
        return x


# ---------------------------------------------------------------------------------------------- the loader


class _BatchPlan:
    """Which windows batch ``b`` of epoch ``e`` holds on this rank: a pure function, shared with workers."""

    def __init__(
        self, dataset: TokenDataset, batch_size: int, shuffle: bool, seed: int, drop_last: bool, rank: int, world: int
    ) -> None:
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.windows = len(dataset)
        self.per_rank = self.windows // world  # the tail < world is left out: no window twice in an epoch
        self.batches = self.per_rank // batch_size if drop_last else -(-self.per_rank // batch_size)
        self._perm: IndexPermutation | None = None
        self._perm_epoch = -1

    def windows_of(self, epoch: int, b: int) -> list[int]:
        first, last = b * self.batch_size, min((b + 1) * self.batch_size, self.per_rank)
        positions = [k * self.world + self.rank for k in range(first, last)]
        if not self.shuffle:
            return positions
        if self._perm is None or self._perm_epoch != epoch:
            self._perm, self._perm_epoch = IndexPermutation(self.windows, self.seed, epoch), epoch
        return [self._perm(g) for g in positions]

    def fetch(self, epoch: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dataset.batch(self.windows_of(epoch, b))


class _Batches(Dataset):
    """Item ``(epoch, b)`` is a whole batch: workers build batches, the main process only receives them."""

    def __init__(self, plan: _BatchPlan) -> None:
        self.plan = plan

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.plan.fetch(*key)

    def __len__(self) -> int:
        return self.plan.batches


class _Keys(Sampler):
    def __init__(self, epoch: int, start: int, stop: int) -> None:
        self.epoch, self.start, self.stop = epoch, start, stop

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, b) for b in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def _env_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class TokenLoader:
    """Batches of a :class:`TokenDataset`, shuffled per epoch by a seeded :class:`IndexPermutation`.

    Epoch ``e`` on rank ``r`` of ``world_size`` takes the permuted windows at global positions
    ``r, r + world_size, ...`` (disjoint across ranks, together all windows but a tail shorter
    than ``world_size``), ``batch_size`` at a time. The order depends only on ``seed``, the epoch
    and the corpus, not on ``num_workers`` (workers build whole batches, delivered in order).

    Position: ``state_dict()`` is ``{"epoch", "position"}`` (batches the epoch's iterator has
    handed over) plus the facts a resume must share; ``load_state_dict()`` makes the next
    ``iter()`` start there, computing nothing it skips: O(1) at any position. The epoch's
    iterator is the first ``iter()`` after ``set_epoch``, ``load_state_dict`` or the end of
    the previous epoch; exhausting it moves to the next epoch. Any other ``iter()`` meanwhile
    (an evaluation of training loss on this loader, a validation loader read again) starts the
    current epoch from its first batch and moves nothing, so evaluating never shifts the
    training position and always sees the same batches. The engine calls ``set_epoch(e)``
    before each epoch.

    Rank and world size default to torch.distributed's, else the ``RANK``/``WORLD_SIZE`` that
    torchrun sets; the engine keeps such a loader as it is under torchrun.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise CorpusError(f"batch_size must be an int >= 1, got {batch_size!r}")
        env_rank, env_world = _env_rank()
        self.rank = env_rank if rank is None else rank
        self.world_size = env_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise CorpusError(f"rank must be in [0, world_size={self.world_size}), got {self.rank}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.drop_last, self.num_workers, self.pin_memory = drop_last, num_workers, pin_memory
        self.prefetch_factor = prefetch_factor
        self._plan = _BatchPlan(dataset, batch_size, shuffle, seed, drop_last, self.rank, self.world_size)
        if self._plan.batches == 0:
            raise CorpusError(
                f"{dataset.split} split of {dataset.folder}: {len(dataset)} window(s) of context "
                f"{dataset.context_length} over {self.world_size} process(es) give no batch of {batch_size} "
                "(drop_last); use a smaller batch size, a smaller stride, or more text"
            )
        self.epoch, self.position = 0, 0
        self._resume_at: int | None = None
        self._epoch_iter: int | None = None  # id of the epoch's iterator; None: the next iter() is it
        self._iters = 0

    def __len__(self) -> int:
        return self._plan.batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position, self._resume_at, self._epoch_iter = epoch, 0, None, None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "windows": self._plan.windows,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("windows", "batch_size", "world_size", "rank", "seed", "shuffle"):
            if state.get(key) != mine[key]:
                raise CorpusError(
                    f"loader state is for {key}={state.get(key)!r}, this loader has {key}={mine[key]!r}; "
                    "resume with the same corpus, context, stride, batch size, seed and process count"
                )
        if not 0 <= state["position"] <= len(self):
            raise CorpusError(f"loader position {state['position']} is outside this loader's {len(self)} batches")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._resume_at, self._epoch_iter = self.position, None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._iters += 1
        if self._epoch_iter is not None:  # the epoch is being read: an independent pass from its start
            return self._batches(self.epoch, 0, None)
        # resumed at the very end of an epoch: nothing is left of it, the next iter() is the next epoch
        start, self._resume_at = self._resume_at or 0, None
        self.position, self._epoch_iter = start, self._iters
        return self._batches(self.epoch, start, self._iters)

    def _batches(self, epoch: int, start: int, owner: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # an independent pass (an evaluation reading a few batches) is read here: starting workers
        # for it would cost more than the batches
        if self.num_workers == 0 or owner is None:
            source: Iterator[Any] = (self._plan.fetch(epoch, b) for b in range(start, len(self)))
        else:
            source = iter(
                torch.utils.data.DataLoader(
                    _Batches(self._plan),
                    batch_size=None,
                    sampler=_Keys(epoch, start, len(self)),
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    prefetch_factor=self.prefetch_factor,
                    # its own generator: a DataLoader with workers draws their base seed from the global
                    # RNG otherwise, and dropout downstream would differ from a run with num_workers=0
                    generator=torch.Generator().manual_seed(self.seed),
                )
            )
        for batch in source:
            if self.pin_memory and (self.num_workers == 0 or owner is None):
                batch = (batch[0].pin_memory(), batch[1].pin_memory())
            # counted when handed over, not when fetched: prefetched batches are not consumed yet
            if owner is not None and owner == self._epoch_iter:
                self.position += 1
            yield batch
        if owner is not None and owner == self._epoch_iter:
            self.epoch, self.position, self._epoch_iter = epoch + 1, 0, None

    def windows_of_batch(self, epoch: int, b: int) -> list[int]:
        """The window indices of batch ``b`` of ``epoch`` on this rank (for tests and inspection)."""
        return self._plan.windows_of(epoch, b)


def corpus_loaders(
    folder: str | os.PathLike[str],
    batch_size: int = 2,
    context_length: int = 256,
    *,
    stride: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    verify: str = "once",
    access: str = "pread",
) -> tuple[TokenLoader, TokenLoader]:
    """Train and validation loaders over a prepared corpus, as :func:`~enginekit.data.verdict_loaders` is for the story.

    Stride defaults to the context length (no overlap, as appendix D). The training loader
    shuffles (seeded), drops the last partial batch, shards by rank under torchrun and uses
    ``num_workers``; the validation loader neither shuffles nor drops, every rank reads all of
    it, in the main process (an evaluation reads a few batches: workers would cost more).
    """
    train = TokenLoader(
        TokenDataset(folder, "train", context_length, stride, verify=verify, access=access),
        batch_size,
        seed=seed,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
    val = TokenLoader(
        TokenDataset(folder, "val", context_length, stride, verify=verify, access=access),
        batch_size,
        shuffle=False,
        drop_last=False,
        rank=0,
        world_size=1,
        pin_memory=pin_memory,
    )
    return train, val
