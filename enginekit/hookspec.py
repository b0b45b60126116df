"""The hook protocol: every hook the engine emits, when, and what is guaranteed at that moment.

One ``fit`` call emits, in this order::

    before_fit(engine)
      before_epoch(engine)                  once per epoch
        before_step(engine, batch)          once per optimizer step, before any forward
          [forward + loss + backward per micro-batch, under autocast]
          [GradScaler.unscale_ when fp16]
        after_backward(engine)              gradients complete and unscaled
          [optimizer.step(); optimizer.zero_grad(set_to_none=True)]
        after_step(engine, loss)            the step is done
      after_epoch(engine)
    after_fit(engine)
    on_exception(engine, error)             instead of the rest, when fit is cut short

Every hook receives the :class:`~enginekit.Engine` as ``engine``; read counters from
``engine.state`` (a :class:`~enginekit.TrainState`), the model from ``engine.model`` and the
optimizer from ``engine.optimizer``. Hooks return nothing; the engine ignores return values.

Guarantees belong to the hooks, not to the order plugins are registered in: a plugin never
needs ``tryfirst``/``trylast`` to be correct with the built-in plugins, except where a
docstring below says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .engine import Engine

PROJECT = "enginekit"

hookspec = pluggy.HookspecMarker(PROJECT)
#: Decorate plugin methods with this (``@hookimpl``, or ``@hookimpl(trylast=True)``).
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def before_fit(engine: Engine) -> None:
    """Once, at the start of :meth:`Engine.fit`, before the first epoch.

    Guaranteed: ``engine.state.total_steps``, ``steps_per_epoch`` and ``epochs`` are final;
    no step of this fit has run. The built-in schedules take their peak from each parameter
    group's ``initial_lr`` (set from ``lr`` the first time, as torch's schedulers do), so a
    second fit plans from the same peak. Validate settings against the run here and raise
    ``ValueError``.

    Resuming happens here too: :class:`~enginekit.plugins.Checkpoint` restores model,
    optimizer, counters and every plugin's state in a ``trylast`` implementation, so it
    overwrites what the other plugins set up from the fresh optimizer.

    Used by: LRWarmup, CosineDecay, GradClip (resolve and validate against the run),
    LossTracker (output folder), ProgressBar (open the bar), Checkpoint (resume).
    """


@hookspec
def before_epoch(engine: Engine) -> None:
    """At the start of each epoch, before its first batch is drawn.

    Guaranteed: ``engine.state.epoch`` is the 0-based index of the epoch about to run; a
    ``DistributedSampler``'s ``set_epoch`` has been called. When a run resumes mid-epoch this
    fires again for that epoch, with ``engine.state.step_in_epoch > 0``.

    Used by: no built-in plugin (the engine itself calls ``set_epoch``); per-epoch setup of
    your own, such as curriculum or data-mixing schedules, belongs here.
    """


@hookspec
def before_step(engine: Engine, batch: Any) -> None:
    """Once per optimizer step, before any forward pass: set the learning rate here.

    ``batch`` is what the training loader yielded for this step, still on the host; with
    ``grad_accum_steps > 1`` it is the list of the step's micro-batches.

    Guaranteed: ``engine.state.step`` is the 0-based index of this step (the book's
    ``global_step``), the same value every hook of this step sees; gradients are ``None``.
    Fires once per optimizer step, never per micro-batch.

    Used by: LRWarmup, CosineDecay.
    """


@hookspec
def after_backward(engine: Engine) -> None:
    """Once per optimizer step, after every micro-batch's backward, before ``optimizer.step()``.

    Guaranteed: the gradients are complete for the whole step (all micro-batches accumulated)
    and unscaled (the engine called ``GradScaler.unscale_`` first), the loss is finite (the
    engine's non-finite policy has run), so clipping here is correct whatever the plugin
    order. Modifying gradients here changes the update.

    Used by: GradClip.
    """


@hookspec
def after_step(engine: Engine, loss: Any) -> None:
    """Once per optimizer step, after ``optimizer.step()`` and ``zero_grad``.

    ``loss`` is the step's training loss as a detached 0-dim tensor on the device (the mean
    over micro-batches). Call ``.item()`` only when you need the number: it synchronises
    with the device.

    Guaranteed: ``engine.state.step`` is still this step's index; ``tokens_seen`` includes
    this step; the learning rate in ``engine.optimizer.param_groups`` is the one this step
    used. Set ``engine.state.should_stop = True`` to end the run after this step.

    Used by: LossTracker (evaluate, record), ProgressBar (update), Checkpoint (save, in a
    ``trylast`` implementation so the saved state includes every other plugin's work).
    """


@hookspec
def after_epoch(engine: Engine) -> None:
    """After the last step of each epoch (also when ``should_stop`` cut the epoch short).

    Guaranteed: ``engine.state.epoch`` is the epoch that just ended; ``engine.state.step``
    counts the completed steps.

    Used by: SampleText (generate), Checkpoint (save at epoch end, ``trylast``).
    """


@hookspec
def after_fit(engine: Engine) -> None:
    """Once, when the run ends normally (all steps done, or ``should_stop``).

    Not called when fit is cut short by an error or a signal: ``on_exception`` is.

    Used by: LossTracker (plots), ProgressBar (close).
    """


@hookspec
def on_exception(engine: Engine, error: BaseException) -> None:
    """When ``fit`` is cut short, just before the error propagates.

    ``error`` is a :class:`~enginekit.TrainingInterrupted` after SIGINT/SIGTERM (the current
    step finished and the state is consistent: a good moment to save), a
    :class:`~enginekit.NonFiniteLossError`, a :class:`~enginekit.PluginError`, or any other
    exception. An exception raised here is reported as a warning and does not hide ``error``.

    Used by: Checkpoint (saves on TrainingInterrupted only), ProgressBar (close).
    """
