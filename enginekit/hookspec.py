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
          after_evaluate(engine, metrics)   whenever a plugin evaluates (inside the step's hooks)
        on_save_point(engine, "step")       the step's work is all done: persist it
        [after SIGINT/SIGTERM: on_save_point(engine, "signal"), then on_exception; the same
         after before_fit, after_epoch or after_fit when the signal came during them]
      after_epoch(engine)
      on_save_point(engine, "epoch")        the epoch's work is all done
    after_fit(engine)
    on_exception(engine, error)             instead of the rest, when fit is cut short

Every hook receives the :class:`~enginekit.Engine` as ``engine``; read counters and plan facts
from ``engine.state`` (a :class:`~enginekit.TrainState`), numbers of the run from
``engine.metrics`` (the metrics channel), the model from ``engine.model`` and the optimizer from
``engine.optimizer``. Hooks return nothing; the engine ignores return values.

Plugins talk through the engine only: facts of a plan on ``engine.state`` (published in
``before_fit``, read later), numbers on ``engine.metrics``, events as hooks. Guarantees belong to
the hooks, never to the order plugins are registered in: no plugin needs ``tryfirst``,
``trylast`` or a wrapper to be correct; those are for cosmetics (which line prints first).
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
    no step of this fit has run. The plan facts (``warmup_steps``, ``peak_lrs``, ``lr_decay``)
    are reset to their defaults (``peak_lrs`` from each group's ``initial_lr``, set from ``lr``
    the first time, as torch's schedulers do): the plugin that owns a fact publishes it here;
    readers read it from ``before_epoch`` on. Validate settings against the run here and raise
    ``ValueError``.

    Resuming happens here too: :class:`~enginekit.plugins.Checkpoint` restores model,
    optimizer, counters and every plugin's state after every other implementation (the code
    after ``yield`` in a ``wrapper=True`` implementation), so restored state wins over what the
    other plugins set up from the fresh optimizer.

    Used by: LRWarmup (publishes ``warmup_steps``), CosineDecay (publishes ``lr_decay``),
    GradClip, LossTracker (output folder), ProgressBar (open the bar), Checkpoint (resume).
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

    The engine publishes ``lr`` (group 0's learning rate) on ``engine.metrics`` right after
    this hook, so it is the rate this step uses.

    Used by: LRWarmup, CosineDecay.
    """


@hookspec
def after_backward(engine: Engine) -> None:
    """Once per optimizer step, after every micro-batch's backward, before ``optimizer.step()``.

    Guaranteed: the gradients are complete for the whole step (all micro-batches accumulated)
    and unscaled (the engine called ``GradScaler.unscale_`` first), the loss is finite (the
    engine's non-finite policy has run, and ``step_loss`` is on ``engine.metrics``), so clipping
    here is correct whatever the plugin order. Modifying gradients here changes the update.

    Used by: GradClip (publishes ``grad_norm``).
    """


@hookspec
def after_step(engine: Engine, loss: Any) -> None:
    """Once per optimizer step, after ``optimizer.step()`` and ``zero_grad``.

    ``loss`` is the step's training loss as a detached 0-dim tensor on the device (the mean
    over micro-batches). Call ``.item()`` only when you need the number: it synchronises
    with the device.

    Guaranteed: ``engine.state.step`` is still this step's index; ``tokens_seen`` includes
    this step; the learning rate in ``engine.optimizer.param_groups`` is the one this step
    used. Set ``engine.state.should_stop = True`` to end the run after this step. No checkpoint
    of this step has been taken yet: that happens in ``on_save_point``, after every
    implementation of this hook (wrappers included) has returned.

    Used by: LossTracker (evaluate, record), ProgressBar (update).
    """


@hookspec
def after_evaluate(engine: Engine, metrics: dict[str, float]) -> None:
    """After each evaluation, emitted by whoever evaluated through :meth:`Engine.publish_evaluation`.

    ``metrics`` is the evaluation's results as floats (the built-in LossTracker:
    ``{"train_loss": ..., "val_loss": ...}``, ``val_loss`` NaN without a validation loader);
    the same values are already on ``engine.metrics``, tagged with this step.

    Guaranteed: fires inside the step whose evaluation it reports (``engine.state.step`` is
    that step's index when evaluating from ``after_step``), before any checkpoint of that step
    is taken, so a reaction (``should_stop``, state of your own) is saved with the step and
    is correct in every registration order. Publish derived numbers (accuracy, a best-so-far)
    on ``engine.metrics`` here and they join the step's metrics row.

    Used by: EarlyStopping.
    """


@hookspec
def on_save_point(engine: Engine, reason: str) -> None:
    """The state is complete and consistent for a moment a run can resume from: persist it.

    ``reason`` is ``"step"`` (after every implementation of ``after_step`` of each finished
    step, wrappers included), ``"epoch"`` (after every implementation of ``after_epoch``, the
    counters already at the next epoch), or ``"signal"`` (after SIGINT/SIGTERM, at the first
    moment the state is consistent: after the step in progress, after ``before_fit`` (resume
    loading included), after ``after_epoch`` or after ``after_fit``; just before
    :class:`~enginekit.TrainingInterrupted` is raised).

    Guaranteed: ``engine.state.step`` counts finished steps; every other plugin's work for the
    moment is done, whatever ``tryfirst``/``trylast`` they use. Implementations must not change
    training state (model, optimizer, RNG, counters, any plugin's ``state_dict``): they only
    write it out, so several persisters are correct in any order (``engine.state`` is read-only
    here: assigning a counter fails, naming the plugin). An exception here ends fit
    with a :class:`~enginekit.PluginError`: a failed save is never silent.

    Used by: Checkpoint (save).
    """


@hookspec
def after_epoch(engine: Engine) -> None:
    """After the last step of each epoch (also when ``should_stop`` cut the epoch short).

    Guaranteed: ``engine.state.epoch`` is the epoch that just ended; ``engine.state.step``
    counts the completed steps. The epoch's checkpoint is taken after this hook (in
    ``on_save_point(engine, "epoch")``), so it includes what plugins do here.

    Used by: SampleText (generate).
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
    step finished and ``on_save_point(engine, "signal")`` already ran; a signal that arrived
    during ``after_fit`` is reported here too, after it), a
    :class:`~enginekit.NonFiniteLossError`, a :class:`~enginekit.PluginError`, or any other
    exception. An exception raised here is reported as a warning and does not hide ``error``.

    Used by: ProgressBar (close).
    """
