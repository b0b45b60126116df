"""torchrun glue: join the process group, shard the data, wrap the model in DDP (or shard it with
FSDP, see fsdp.py), agree across ranks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from .state import TrainState

__all__ = ["Distributed", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` is cuda (this process's GPU under torchrun), then mps, then cpu."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if str(device) != "auto":
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device {device!r} is not a device torch knows: {exc}; try 'auto', 'cpu', 'cuda'"
            ) from exc
        # under torchrun a bare "cuda" means this process's GPU, not GPU 0 for every rank
        if resolved.type == "cuda" and resolved.index is None:
            resolved = torch.device("cuda", local_rank)
        _check_available(device, resolved)
        return resolved
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def available_devices() -> list[str]:
    """The devices this machine can train on, as ``torch.device`` strings."""
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def _check_available(asked: object, device: torch.device) -> None:
    """A device this machine lacks is one clear line, not torch's assertion deep in ``.to()``."""
    if device.type == "cpu":
        return
    if device.type == "meta":
        raise ValueError(
            f"device {str(asked)!r} cannot train: meta tensors hold no data (no loss, no update); pass 'auto' or a "
            f"real device: {', '.join(available_devices())}"
        )
    available = available_devices()
    if device.type == "cuda":
        ok = torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    elif device.type == "mps":
        ok = "mps" in available
    else:  # other backends (xpu, xla, ...): a tensor there, or torch's reason in one line
        try:
            torch.empty(1, device=device)
            return
        except (RuntimeError, AssertionError, NotImplementedError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"device {str(asked)!r} is not usable here ({reason}); it has: {', '.join(available)}. "
                "Pass one of those, or 'auto' to pick the best"
            ) from None
    if not ok:
        raise ValueError(
            f"device {str(asked)!r} is not available on this machine; it has: {', '.join(available)}. "
            "Pass one of those, or 'auto' to pick the best"
        )


class Distributed:
    """Data parallelism under torchrun (``WORLD_SIZE > 1``); every method is a no-op otherwise.

    ``strategy="ddp"`` wraps the model in DistributedDataParallel (``self.ddp``); ``"fsdp"``
    shards it in place with ``fully_shard`` (``self.sharded`` is the model itself then).
    """

    def __init__(self, device: torch.device, strategy: str = "ddp", param_dtype: torch.dtype | None = None) -> None:
        self.device = device
        self.strategy = strategy
        self.param_dtype = param_dtype
        self.ddp: nn.Module | None = None
        self.sharded: nn.Module | None = None
        self.active = False  # an attribute, not a property: the step reads it every time
        self._owns_process_group = False

    def setup(
        self,
        model: nn.Module,
        train_loader: Iterable[Any],
        state: TrainState,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Iterable[Any]:
        """Join the group, wrap ``model`` in DDP (or shard it); returns the training loader sharded for this rank."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1 or self.ddp is not None or self.sharded is not None:
            return train_loader
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        if not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._owns_process_group = True
        state.rank, state.world_size = dist.get_rank(), dist.get_world_size()
        loader = train_loader
        if _shards_itself(loader, state):
            pass  # e.g. enginekit.corpus.TokenLoader: built for this rank and world size
        elif not isinstance(loader, DataLoader) or not isinstance(loader.sampler, DistributedSampler):
            # one shuffle seed for all ranks, or their shards would overlap
            seed = torch.tensor([torch.initial_seed() % 2**31], device=self.device)
            dist.broadcast(seed, src=0)
            loader = shard_loader(loader, state.rank, state.world_size, int(seed.item()))
        if self.strategy == "fsdp":
            from .fsdp import shard

            assert optimizer is not None
            self.sharded = shard(model, optimizer, self.device, self.param_dtype)
        else:
            device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=device_ids)
        self.active = True
        return loader

    def no_sync(self) -> contextlib.AbstractContextManager[Any]:
        """Around the backward of every micro-batch but a step's last: no gradient communication."""
        if self.sharded is not None:
            from .fsdp import no_sync

            return no_sync(self.sharded)
        return self.ddp.no_sync()  # type: ignore[union-attr, operator]

    def gathered(self, model: nn.Module) -> contextlib.AbstractContextManager[Any]:
        """FSDP: the whole model on every rank while inside (see fsdp.gathered); otherwise nothing."""
        if self.sharded is None:
            return contextlib.nullcontext()
        from .fsdp import gathered

        return gathered(self.sharded)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state dict: gathered from the shards under FSDP (every rank must call)."""
        if self.sharded is None:
            return model.state_dict()
        from .fsdp import full_state_dict

        return full_state_dict(self.sharded)

    def teardown(self) -> None:
        if self.sharded is not None:
            return  # the shards live on the process group: it stays up for the model's later use (see fsdp.py)
        if self.ddp is None:
            return
        import torch.distributed as dist

        self.ddp, self.active = None, False
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over ranks (a copy)."""
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        return value / dist.get_world_size()

    def agree_on_stop(self, signum: int | None, should_stop: bool) -> tuple[int | None, bool]:
        """A stop (signal or should_stop) on any rank stops every rank after the same step."""
        import torch.distributed as dist

        flags = torch.tensor([signum or 0, int(should_stop)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        agreed_signum, stop = (int(v) for v in flags.tolist())
        return agreed_signum or None, bool(stop)

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank; every rank must call it."""
        if not self.active:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank; every rank must call it."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any, world_size: int) -> list[Any]:
        """Every rank's ``obj``, by rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, obj)
        return gathered


def shard_loader(loader: Any, rank: int, world_size: int, seed: int) -> DataLoader:
    """``loader`` rebuilt to yield this rank's shard, every other setting kept.

    The sampler becomes a ``DistributedSampler`` (shuffling if the loader shuffled, seeded alike on
    every rank). ``DataLoader.drop_last`` keeps its meaning (drop the last incomplete batch); the
    sampler pads the shards to equal length instead of dropping samples. A custom sampler or
    batch sampler cannot be sharded without knowing its logic, so it is refused.
    """
    from torch.utils.data import BatchSampler, SequentialSampler
    from torch.utils.data.distributed import DistributedSampler

    if not isinstance(loader, DataLoader):
        raise ValueError(
            "under torchrun the engine shards a torch DataLoader with a DistributedSampler; "
            f"got {type(loader).__name__}: pass a DataLoader (or shard the data yourself and run without torchrun)"
        )
    custom_batches = loader.batch_sampler is not None and type(loader.batch_sampler) is not BatchSampler
    if custom_batches or not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        kind = type(loader.batch_sampler if custom_batches else loader.sampler).__name__
        raise ValueError(
            f"under torchrun the engine cannot shard a DataLoader with a custom {kind}: give it a "
            "DistributedSampler yourself (DataLoader(..., sampler=DistributedSampler(dataset, ...))) or a "
            "sampler that yields only this rank's indices, and the engine keeps your loader as it is"
        )
    sampler: DistributedSampler[Any] = DistributedSampler(
        loader.dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=seed,
    )
    workers = loader.num_workers > 0
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        drop_last=loader.drop_last,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        collate_fn=loader.collate_fn,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if workers else None,
        persistent_workers=loader.persistent_workers if workers else False,
        multiprocessing_context=loader.multiprocessing_context,
        pin_memory_device=loader.pin_memory_device,
        in_order=getattr(loader, "in_order", True),
    )


def _shards_itself(loader: Any, state: TrainState) -> bool:
    """A loader with ``rank``/``world_size`` attributes and ``set_epoch`` shards itself; a wrong rank is refused."""
    if not (hasattr(loader, "rank") and hasattr(loader, "world_size") and hasattr(loader, "set_epoch")):
        return False
    if (loader.rank, loader.world_size) != (state.rank, state.world_size):
        raise ValueError(
            f"train_loader is built for rank {loader.rank} of {loader.world_size}, but this process is rank "
            f"{state.rank} of {state.world_size}; build it under torchrun with rank=None and world_size=None"
        )
    return True


def set_sampler_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Tell the epoch to a loader that shards or shuffles by it (its own ``set_epoch``, or its sampler's)."""
    target: Any = loader if hasattr(loader, "set_epoch") else getattr(loader, "sampler", None)
    if callable(getattr(target, "set_epoch", None)):
        target.set_epoch(epoch)
