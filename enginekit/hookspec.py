"""The hook protocol: every hook the engine emits, when, and what is guaranteed at that moment.

One ``fit`` call emits, in this order::

    before_fit(engine)
      before_epoch(engine)                  once per epoch
        before_step(engine, batch)          once per optimizer step, before any forward
          [forward + loss + backward per micro-batch, under autocast]
          [GradScaler.unscale_ when fp16]
        after_backward(engine)              gradients complete, unscaled, not yet modified: READ them
        before_optimizer_step(engine)       the same gradients: CHANGE them (clip) here
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

Read, then change: within a step every plugin that only reads a quantity sees it before any
plugin changes it, whatever the order. Gradients are read in ``after_backward`` and changed in
``before_optimizer_step``. Learning rates compose by one rule: schedules *set* each group's
base lr in ``before_step``; modifiers never write ``param_groups``, they *scale* it through
``engine.lr_scales[engine.name_of(self)] = factor`` (:class:`~enginekit.plan.LRScales`), which
the engine multiplies in after every ``before_step`` implementation. Each hook below says what
a plugin may read and what it may change there.
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

    May read: the totals; the optimizer and model as set up. May change: the plan facts this
    plugin owns (``warmup_steps`` and ``lr_decay`` have one owner each: a second plugin setting
    one gets a ``ValueError`` naming both, in either order), its own state.

    Used by: LRWarmup (publishes ``warmup_steps``), CosineDecay (publishes ``lr_decay``),
    GradClip, LossTracker (output folder), ProgressBar (open the bar), Checkpoint (resume).
    """


@hookspec
def before_epoch(engine: Engine) -> None:
    """At the start of each epoch, before its first batch is drawn.

    Guaranteed: ``engine.state.epoch`` is the 0-based index of the epoch about to run; a
    ``DistributedSampler``'s ``set_epoch`` has been called. When a run resumes mid-epoch this
    fires again for that epoch, with ``engine.state.step_in_epoch > 0``.

    May read: every plan fact (final now). May change: per-epoch settings of your own.

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

    May change: each group's base learning rate (``param_groups[i]["lr"]``), if this plugin
    is a schedule; a modifier's factor (``engine.lr_scales[name]``) for this step. After every
    implementation has run, the engine multiplies each group's lr by the factors in
    ``engine.lr_scales`` (the same result in every order) and publishes ``lr`` (group 0's
    effective rate) on ``engine.metrics``: the rate this step uses. It writes the base back
    after ``after_step``, so a schedule-less run never compounds a factor. May read: the base
    lrs other schedules set are only final after this hook; read the effective rate later.

    Used by: LRWarmup, CosineDecay, LRScheduler (as a schedule).
    """


@hookspec
def after_backward(engine: Engine) -> None:
    """Once per optimizer step, after every micro-batch's backward: READ the gradients here.

    Guaranteed: the gradients are complete for the whole step (all micro-batches accumulated),
    unscaled (the engine called ``GradScaler.unscale_`` first) and not yet modified by any
    plugin (clipping happens later, in ``before_optimizer_step``), in every registration order;
    the loss is finite (the engine's non-finite policy has run, and ``step_loss`` is on
    ``engine.metrics``); the update has not happened.

    May read: gradients, parameters, ``engine.metrics``, the effective lr. May change: nothing
    of the step (publish statistics on ``engine.metrics``); changing gradients belongs in
    ``before_optimizer_step``, so every reader here sees them as backward left them.

    Used by: your gradient statistics (per-layer norms, histograms).
    """


@hookspec
def before_optimizer_step(engine: Engine) -> None:
    """Once per optimizer step, after every ``after_backward`` implementation, just before
    ``optimizer.step()`` (``GradScaler.step`` in fp16): CHANGE the gradients here.

    Guaranteed: the same complete, unscaled gradients every ``after_backward`` reader saw;
    the loss is finite; ``engine.state.step`` is this step's index; the lr in ``param_groups``
    is the effective one this step uses. Not emitted for a step the non-finite policy or an
    fp16 overflow dropped.

    May read: gradients (as other writers leave them: writers that must compose, such as two
    clippers, apply in registration order), parameters. May change: gradients (clip, add
    noise, mask), in place. Not the lr: it is fixed for this step (set it in ``before_step``
    or scale it through ``engine.lr_scales`` from the next step on).

    Used by: GradClip (clips; publishes ``grad_norm``, the norm before clipping).
    """


@hookspec
def after_step(engine: Engine, loss: Any) -> None:
    """Once per optimizer step, after ``optimizer.step()`` and ``zero_grad``.

    ``loss`` is the step's training loss as a detached 0-dim tensor on the device (the mean
    over micro-batches). Call ``.item()`` only when you need the number: it synchronises
    with the device.

    Guaranteed: ``engine.state.step`` is still this step's index; ``tokens_seen`` includes
    this step; the learning rate in ``engine.optimizer.param_groups`` is the one this step
    used (the effective one; the engine writes the base back after this hook). Set
    ``engine.state.should_stop = True`` to end the run after this step. No checkpoint
    of this step has been taken yet: that happens in ``on_save_point``, after every
    implementation of this hook (wrappers included) has returned.

    May read: the updated weights, the step's metrics. May change: ``should_stop``,
    ``engine.lr_scales`` (counts from the next step), the state of this plugin; evaluate and
    report through :meth:`Engine.publish_evaluation`. Not ``param_groups``' lr.

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

    May read: ``metrics``, ``engine.metrics``, the weights just evaluated. May change:
    ``should_stop``, ``engine.lr_scales`` (a plateau reducer: from the next step on), this
    plugin's state. Not ``param_groups``' lr (the next ``before_step`` schedule overwrites it).

    Used by: EarlyStopping, ReduceLROnPlateau, LRScheduler (with ``monitor``), BestCheckpoint,
    LossTracker (a metrics row for every evaluation, whoever evaluated).
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
    here: assigning a counter fails, naming the plugin). An exception here ends fit with that
    exception (a note names the plugin): a failed save is never silent.

    May read: everything (the base lrs are back in ``param_groups``; ``engine.lr_scales`` and
    every plugin's state are final for the moment). May change: nothing; write it out.

    Used by: Checkpoint (save).
    """


@hookspec
def after_epoch(engine: Engine) -> None:
    """After the last step of each epoch (also when ``should_stop`` cut the epoch short).

    Guaranteed: ``engine.state.epoch`` is the epoch that just ended; ``engine.state.step``
    counts the completed steps. The epoch's checkpoint is taken after this hook (in
    ``on_save_point(engine, "epoch")``), so it includes what plugins do here. Under
    ``strategy="fsdp"`` the model is whole (gathered) on every rank during this hook, so one
    rank may run it alone, as SampleText does on rank 0.

    May read: the weights, counters, ``engine.metrics``. May change: this plugin's state,
    ``should_stop``; an evaluation reported here gets its metrics row (tagged with the last
    finished step).

    Used by: SampleText (generate).
    """


@hookspec
def after_fit(engine: Engine) -> None:
    """Once, when the run ends normally (all steps done, or ``should_stop``).

    Not called when fit is cut short by an error or a signal: ``on_exception`` is.

    May read: everything. May change: files of this plugin (plots, summaries).

    Used by: LossTracker (plots), EarlyStopping, ProgressBar (close).
    """


@hookspec
def on_exception(engine: Engine, error: BaseException) -> None:
    """When ``fit`` is cut short, just before the error propagates.

    ``error`` is a :class:`~enginekit.TrainingInterrupted` after SIGINT/SIGTERM (the current
    step finished and ``on_save_point(engine, "signal")`` already ran; a signal that arrived
    during ``after_fit`` is reported here too, after it), a
    :class:`~enginekit.NonFiniteLossError`, a plugin's exception (see
    :func:`~enginekit.plugin_failure`), or any other exception. An exception raised here is
    reported as a warning and does not hide ``error``.

    May read: ``error``, the state as it stands. May change: nothing of the run; close what
    this plugin opened.

    Used by: ProgressBar (close).
    """
