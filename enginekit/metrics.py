"""The metrics channel: named numbers of the run, published by any plugin, read by any plugin."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["Metrics"]


class Metrics:
    """``engine.metrics``: the latest value of every named number, with the step it belongs to.

    Any plugin publishes (``engine.metrics.publish("grad_norm", norm)``) and any plugin reads
    (``engine.metrics["val_loss"]``); plugins never read each other's attributes. A value may be
    a 0-dim tensor: it is stored as is, so publishing never waits for the device, and it becomes
    a Python float the first time someone reads it (one host sync, then cached).

    Each value is tagged with the step it belongs to: the index of the step in progress
    (``engine.state.step`` inside ``before_step`` ... ``after_step`` and ``after_evaluate``),
    or, outside a step, the last finished step (``-1`` before the first). The engine publishes
    ``step_loss`` (the step's training loss, a device tensor) and ``lr`` (parameter group 0's
    learning rate for the step) every step; the built-in plugins publish ``grad_norm``
    (GradClip, before clipping), ``train_loss`` and ``val_loss`` (each evaluation).

    Values are this process's; under torchrun the engine's own (``step_loss``, evaluation
    losses) are already averaged over ranks. The latest values travel with checkpoints.
    """

    def __init__(self) -> None:
        self._values: dict[str, tuple[Any, int]] = {}
        self._serials: dict[str, int] = {}
        self._count = 0
        #: The step new values belong to; the engine keeps it current.
        self.step = -1

    def publish(self, name: str, value: float | torch.Tensor, step: int | None = None) -> None:
        """Set ``name`` to ``value`` (a number or a 0-dim tensor) for ``step`` (default: the current one)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names are non-empty strings, got {name!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric {name!r} must be a single number, got a tensor of shape {tuple(value.shape)}")
            if value.requires_grad:
                value = value.detach()
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"metric {name!r} must be a number or a 0-dim tensor, got {type(value).__name__}")
        self._put(name, value, self.step if step is None else step)

    def _put(self, name: str, value: Any, step: int) -> None:
        """Publish without checks: the engine's own per-step values, known to be well-formed."""
        self._values[name] = (value, step)
        self._count += 1
        self._serials[name] = self._count

    def __getitem__(self, name: str) -> float:
        """The latest value of ``name`` as a float (the one host sync happens here, once)."""
        try:
            value, step = self._values[name]
        except KeyError:
            known = ", ".join(sorted(self._values)) or "none yet"
            raise KeyError(f"no metric {name!r} has been published; published so far: {known}") from None
        if isinstance(value, torch.Tensor):
            value = float(value)
            self._values[name] = (value, step)
        return float(value)

    def get(self, name: str, default: float | None = None) -> float | None:
        """The latest value of ``name``, or ``default`` if it was never published."""
        return self[name] if name in self._values else default

    def step_of(self, name: str) -> int:
        """The step the latest value of ``name`` belongs to."""
        if name not in self._values:
            raise KeyError(f"no metric {name!r} has been published")
        return self._values[name][1]

    def serial(self, name: str) -> int:
        """A number that grows with every publish (of any name): a consumer that remembers it
        knows whether ``name`` has a new value since it last looked (0: never published)."""
        return self._serials.get(name, 0)

    def tensor(self, name: str) -> Any:
        """The latest value of ``name`` as published (a tensor stays a tensor: no sync)."""
        return self._values[name][0]

    def at(self, step: int) -> dict[str, float]:
        """Every metric whose latest value belongs to ``step``, as floats, in publishing order."""
        return {name: self[name] for name, (_, s) in list(self._values.items()) if s == step}

    def as_dict(self) -> dict[str, float]:
        """The latest value of every metric, as floats."""
        return {name: self[name] for name in list(self._values)}

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._values))

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Metrics(step={self.step}, names={list(self._values)})"

    def clear(self) -> None:
        self._values.clear()
        self._serials.clear()

    def state_dict(self) -> dict[str, list[Any]]:
        return {name: [self[name], step] for name, (_, step) in list(self._values.items())}

    def load_state_dict(self, state: dict[str, list[Any]]) -> None:
        self._values = {str(name): (float(value), int(step)) for name, (value, step) in state.items()}
        self._serials = {}
        for name in self._values:
            self._count += 1
            self._serials[name] = self._count
