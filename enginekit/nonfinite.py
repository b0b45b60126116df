"""The non-finite loss policy: a NaN or infinite loss never reaches the weights."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .checks import check_count
from .errors import NonFiniteLossError
from .state import TrainState

__all__ = ["NONFINITE_POLICIES", "NonFinitePolicy"]

NONFINITE_POLICIES = ("error", "skip")


class NonFinitePolicy:
    """``"error"``: raise before the update. ``"skip"``: drop the step's gradients and let the
    loop retry the step with the next batch, up to ``max_skips`` times in a row."""

    def __init__(self, policy: str, max_skips: int) -> None:
        if policy not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {policy!r}")
        check_count("", "max_skips", max_skips)
        self.policy = policy
        self.max_skips = max_skips

    def skip_or_raise(
        self,
        loss: torch.Tensor,
        state: TrainState,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None,
        say: Callable[[str], None],
    ) -> None:
        """The step's loss is not finite (the engine checked, with the step's one host read):
        raise, or drop the gradients and count a skip so the loop retries with the next batch."""
        optimizer.zero_grad(set_to_none=True)
        where = f"at step {state.step} (epoch {state.epoch + 1}, batch {state.batches_in_epoch} of the epoch)"
        if self.policy == "error":
            raise NonFiniteLossError(
                f"training loss is {loss.item()} {where}; stopped before the update, so this step's gradients "
                "reached neither the weights nor the optimizer state. Lower the learning rate, "
                "check the data, or pass nonfinite='skip'"
            )
        state.skipped_steps += 1
        if scaler is not None:
            scaler.update()  # closes this step's unscale_ (and lowers the scale if grads overflowed)
        say(f"enginekit: non-finite loss {where}: skipped ({state.skipped_steps}/{self.max_skips})")
        if state.skipped_steps >= self.max_skips:
            raise NonFiniteLossError(
                f"{state.skipped_steps} consecutive steps had a non-finite loss, the last {where}; giving up"
            )
