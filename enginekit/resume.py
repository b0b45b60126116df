"""Resume bookkeeping: where the run stands in the data, and the engine's part of a checkpoint."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .state import TrainState, capture_rng, restore_rng

__all__ = ["DataPosition", "engine_state_dict", "load_engine_state", "loader_state"]


def loader_state(loader: Any) -> dict[str, Any] | None:
    """A loader that keeps its own position (``state_dict``/``load_state_dict``, such as
    :class:`enginekit.corpus.TokenLoader` or torchdata's ``StatefulDataLoader``): its state, stored
    in checkpoints and restored directly instead of replaying the epoch. None for other loaders."""
    if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
        return loader.state_dict()
    return None


class DataPosition:
    """Replays an epoch's shuffle so a resumed or continued epoch sees the same batches in the same order.

    The torch RNG state at the start of each epoch is kept: drawing the shuffle again from it
    and skipping the micro-batches already consumed puts the loader where the run left it. A
    loader with its own ``state_dict`` (see :func:`loader_state`) is put there by its
    ``load_state_dict`` instead, in O(1) whatever the position.
    """

    def __init__(self) -> None:
        self.epoch_rng: torch.Tensor | None = None
        self.pending: dict[str, Any] | None = None
        self.loader: Any = None

    def epoch_batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The epoch's batches; after a resume or a cut-short epoch, from where it stood."""
        pending, self.pending = self.pending, None
        self.loader = loader
        if pending is None:
            self.epoch_rng = torch.get_rng_state()
            return iter(loader)
        if "loader" in pending:  # the loader knows its position: no replay
            if not callable(getattr(loader, "load_state_dict", None)):
                raise ValueError(
                    "the checkpoint holds the training loader's own position (a loader with state_dict, such as "
                    f"TokenLoader), but this run's train_loader ({type(loader).__name__}) has none; resume with the "
                    "same kind of loader"
                )
            loader.load_state_dict(pending["loader"])  # type: ignore[attr-defined]
            self.epoch_rng = torch.get_rng_state()
            restore_rng(pending["rng"])
            return iter(loader)
        if pending["epoch_rng"] is not None:
            torch.set_rng_state(pending["epoch_rng"])
        self.epoch_rng = torch.get_rng_state()
        batches = iter(loader)
        for _ in range(pending["batches_in_epoch"]):
            next(batches)
        restore_rng(pending["rng"])
        return batches

    def cut_short(self, batches_in_epoch: int) -> None:
        """The epoch ended early (max_steps, should_stop): a later fit continues it in order."""
        state = loader_state(self.loader)
        if state is not None:
            self.pending = {"loader": state, "rng": capture_rng()}
            return
        self.pending = {"epoch_rng": self.epoch_rng, "batches_in_epoch": batches_in_epoch, "rng": capture_rng()}


def engine_state_dict(state: TrainState, position: DataPosition, rngs: list[dict[str, Any]], **extra: Any) -> dict:
    """The engine's part of a checkpoint, taken between steps (at a save point)."""
    return {
        "step": state.step,
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "batches_in_epoch": state.batches_in_epoch,
        "tokens_seen": state.tokens_seen,
        "should_stop": state.should_stop,
        "epoch_rng": position.epoch_rng if state.batches_in_epoch else None,
        "rng": rngs,
        "world_size": state.world_size,
        **extra,
    }


def load_engine_state(state: TrainState, position: DataPosition, saved: dict[str, Any]) -> dict[str, Any]:
    """Restore the counters and data position of :func:`engine_state_dict`; returns this rank's RNG states."""
    rngs = saved["rng"]
    if saved["world_size"] != state.world_size:
        if saved["batches_in_epoch"]:
            raise ValueError(
                f"checkpoint was written by {saved['world_size']} process(es) in the middle of an epoch but this run "
                f"has {state.world_size}; the rest of that epoch's data order cannot be replayed: resume with "
                f"{saved['world_size']} process(es), or from a checkpoint at an epoch's end"
            )
        # at an epoch's end nothing of the data order is pending: each rank takes a saved rank's RNGs
        # (rank r those of saved rank r mod the old world size); the next epoch is shuffled as this world size does
        rngs = [rngs[rank % len(rngs)] for rank in range(state.world_size)]
    state.step, state.epoch = saved["step"], saved["epoch"]
    state.step_in_epoch, state.batches_in_epoch = saved["step_in_epoch"], saved["batches_in_epoch"]
    state.tokens_seen = saved["tokens_seen"]
    state.should_stop = bool(saved.get("should_stop", False))
    rng = rngs[state.rank]
    if saved["batches_in_epoch"] == 0:
        restore_rng(rng)
        position.pending = None
    elif saved.get("loader") is not None:
        position.pending = {"loader": saved["loader"][state.rank], "rng": rng}
    else:
        position.pending = {"epoch_rng": saved["epoch_rng"], "batches_in_epoch": saved["batches_in_epoch"], "rng": rng}
    return rng
