"""TrainState, the counters plugins read, and the RNG snapshots exact resume needs."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch

__all__ = ["TrainState", "capture_rng", "restore_rng"]


@dataclass
class TrainState:
    """Counters of one training run, read by plugins as ``engine.state``.

    Every counter is 0-based. Inside the hooks of one optimizer step the counters name that
    step; between steps and after ``fit`` they count what is finished.

    Messages for people (resume lines, plugin errors, LossTracker's ``Ep 1 (Iter 000000)``)
    follow the book's own printing: the epoch 1-based (``epoch + 1``: "epoch 1" is the first),
    the step as the 0-based ``step`` (the book's ``global_step``, its ``Iter``).

    Attributes:
        step: index of the optimizer step in progress, the book's ``global_step``: 0 in every
            hook of the first step, the same value in ``before_step``, ``after_backward`` and
            ``after_step`` of one step. Outside a step: the number of completed steps.
        epoch: index of the current epoch (0 for the first; the book prints ``epoch + 1``).
        step_in_epoch: index of the step in progress within the epoch (same convention as
            ``step``).
        batches_in_epoch: micro-batches drawn from the training loader in this epoch so far
            (differs from ``step_in_epoch`` with gradient accumulation or skipped steps).
        epochs: number of epochs this ``fit`` runs.
        steps_per_epoch: optimizer steps in a full epoch (``ceil(len(loader) / grad_accum_steps)``).
        total_steps: optimizer steps in the whole run (``epochs * steps_per_epoch``, or
            ``max_steps`` when smaller); what a schedule plans against.
        tokens_seen: input tokens trained on, this step included from ``after_step`` on
            (``inputs.numel()`` summed over ranks and micro-batches, as the book counts).
        should_stop: set it to ``True`` in any hook to end the run after the current step.
        skipped_steps: consecutive steps skipped for a non-finite loss (``nonfinite="skip"``).
        rank: this process's rank under torchrun (0 otherwise).
        world_size: number of processes under torchrun (1 otherwise).

    Facts of the plan. The engine resets them at the start of every ``fit``; the plugin that
    owns a fact publishes it in ``before_fit``; other plugins read it in later hooks (never in
    ``before_fit``, where the owner may not have run yet). This is how plugins learn of each
    other's plans without importing or finding each other:

        warmup_steps (int): steps of learning-rate warmup, published by the warmup schedule
            (:class:`~enginekit.plugins.LRWarmup` or your own); 0 when nothing warms up.
            Decays start after it, ``GradClip(start_step="after_warmup")`` clips from it.
        peak_lrs (list[float]): the peak learning rate of each parameter group: each group's
            ``initial_lr`` (its lr at the first fit) unless a schedule given an explicit
            ``peak_lr`` publishes another.
        lr_decay (str | None): registration name of the plugin that sets the learning rate
            after warmup (published by a decay schedule such as
            :class:`~enginekit.plugins.CosineDecay`, as ``engine.name_of(self)``); ``None`` when
            nothing decays, and then a warmup holds the peak.

    ``warmup_steps`` and ``lr_decay`` have one owner per fit: the first plugin that sets one
    owns it, and a second plugin setting it (whatever the value, whichever registered first)
    gets a ``ValueError`` naming both, so two warmups or two decays never run silently.
    """

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    batches_in_epoch: int = 0
    epochs: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    tokens_seen: int = 0
    should_stop: bool = False
    skipped_steps: int = 0
    rank: int = 0
    world_size: int = 1
    peak_lrs: list[float] = field(default_factory=list)
    _warmup_steps: int = field(default=0, repr=False)
    _lr_decay: str | None = field(default=None, repr=False)
    #: who owns each single-owner plan fact in this fit (fact -> registration name)
    _owners: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    #: set by the engine: the registration name of the plugin whose code is running, or None
    _whose_code: Callable[[], str | None] | None = field(default=None, repr=False, compare=False)

    @property
    def warmup_steps(self) -> int:
        return self._warmup_steps

    @warmup_steps.setter
    def warmup_steps(self, value: int) -> None:
        self._claim("warmup_steps", "register one warmup schedule only")
        self._warmup_steps = value

    @property
    def lr_decay(self) -> str | None:
        return self._lr_decay

    @lr_decay.setter
    def lr_decay(self, value: str | None) -> None:
        self._claim("lr_decay", "register one decay schedule only")
        self._lr_decay = value

    def _claim(self, fact: str, advice: str) -> None:
        owner = (self._whose_code() if self._whose_code is not None else None) or "code outside any plugin"
        previous = self._owners.setdefault(fact, owner)
        if previous != owner:
            raise ValueError(
                f"plan fact TrainState.{fact} has two owners: plugin {previous!r} set it and plugin {owner!r} "
                f"sets it too; {advice}"
            )

    def reset_plan(self) -> None:
        """The engine's reset at the start of every fit: default plan facts, no owners yet."""
        self._warmup_steps, self._lr_decay, self._owners = 0, None, {}

    #: while set (the name of a hook), assigning a field raises: see :meth:`read_only`
    _read_only_in: ClassVar[str | None] = None

    def __setattr__(self, name: str, value: Any) -> None:
        hook = self._read_only_in
        if hook is not None:
            # raised in the frame of the plugin that assigns, so the failure's note names that plugin
            raise RuntimeError(
                f"engine.state.{name} was changed in {hook}; save points only write state out: change "
                "counters in after_step or after_epoch"
            )
        super().__setattr__(name, value)

    @contextlib.contextmanager
    def read_only(self, hook: str) -> Iterator[None]:
        """While the engine emits ``hook`` (``on_save_point``), assigning any field is an error."""
        object.__setattr__(self, "_read_only_in", hook)
        try:
            yield
        finally:
            object.__delattr__(self, "_read_only_in")

    @property
    def is_main(self) -> bool:
        """True on the process that prints and writes files (rank 0)."""
        return self.rank == 0


def capture_rng() -> dict[str, Any]:
    """Snapshot the python, torch (CPU and CUDA) and numpy RNGs as tensors and plain values."""
    version, internal, gauss = random.getstate()
    rng: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        # the legacy tuple (numpy types it as "str | dict | tuple" across its versions)
        kind, keys, pos, has_gauss, cached = cast(tuple[str, Any, int, int, float], np.random.get_state())
        rng["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` saved."""
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        import numpy as np

        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
