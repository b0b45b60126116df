"""When the host reads the device: the finite-loss check and the stop agreement, every N steps.

Reading a CUDA tensor on the host (``loss.item()``, ``flags.tolist()``) waits for every kernel
queued so far, so the CPU cannot queue the next step while the GPU finishes this one. On a CPU
the read is free. So with ``sync_every=1`` (the default on CPU and MPS, and whenever
``nonfinite="skip"``) the engine reads the loss every step and a non-finite loss never reaches
the weights. With ``sync_every=N > 1`` (the default on CUDA is :data:`CUDA_SYNC_EVERY`) the
device keeps a running "all losses finite" flag and the host reads it, with the torchrun stop
agreement, once every N steps, at the end of each epoch and of fit, and whenever a persister
asks (:meth:`Engine.check_finite`, which :class:`~enginekit.plugins.Checkpoint` calls before it
writes). The guarantee becomes:

* a non-finite loss stops the run at the next read, at most N - 1 steps after it; those steps
  have updated the weights with it, and the error says so and names the range of steps;
* no checkpoint ever holds a state trained on a non-finite loss (every write reads first);
* under torchrun a stop (signal or ``should_stop``) takes effect on every rank at the next read,
  at most N - 1 steps after it was asked for.
"""

from __future__ import annotations

import torch

from .checks import check_count
from .errors import NonFiniteLossError

__all__ = ["CUDA_SYNC_EVERY", "HostSync"]

#: ``sync_every`` on CUDA when not given: a read every 16 steps hides it behind 15 queued steps.
CUDA_SYNC_EVERY = 16


class HostSync:
    """The deferred finite check of one engine (inactive with ``every == 1``)."""

    def __init__(self, every: int | None, device: torch.device, nonfinite: str) -> None:
        if every is None:
            every = CUDA_SYNC_EVERY if device.type == "cuda" and nonfinite == "error" else 1
        check_count("", "sync_every", every)
        if every > 1 and nonfinite != "error":
            raise ValueError(
                f"sync_every={every} needs nonfinite='error': skipping a step needs its loss read on the "
                "host before the update; pass sync_every=1 with nonfinite='skip'"
            )
        self.every = every
        self.reads = 0  # host reads of the flag so far (what a test counts)
        self._finite: torch.Tensor | None = None
        self._first_unread = 0  # the first step the flag covers that the host has not read

    @property
    def deferred(self) -> bool:
        return self.every > 1

    def note(self, loss: torch.Tensor) -> None:
        """Fold this step's loss into the device flag; no host read."""
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite

    def due(self, finished_steps: int) -> bool:
        """Whether the host reads after this many finished steps."""
        return finished_steps % self.every == 0

    def check(self, finished_steps: int) -> None:
        """Read the flag (one host sync); raise if a loss since the last read was not finite."""
        if self._finite is None:
            return
        self.reads += 1
        finite, self._finite = bool(self._finite), None
        first, self._first_unread = self._first_unread, finished_steps
        if not finite:
            raise NonFiniteLossError(
                f"a training loss between step {first} and step {finished_steps - 1} was not finite "
                f"(read every {self.every} steps, sync_every={self.every}); the steps since then have "
                "updated the weights with it, so they are not finite now, but no checkpoint was written "
                "from them. Resume from the newest checkpoint with a lower learning rate, or check the "
                "data; sync_every=1 stops before the update"
            )
