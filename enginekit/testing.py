"""Test a plugin in isolation, the way pytest's ``pytester`` serves pytest plugins.

Three pieces:

* :func:`make_engine` builds a real :class:`~enginekit.Engine` around a stand-in: a model of one
  scalar weight per optimizer parameter group, a synthetic loader of ``steps_per_epoch``
  batches and an SGD optimizer with real ``param_groups``. No GPT, no tokenizer, no data files;
  the loop, the hooks and their guarantees are the real ones, not an imitation. Training
  losses (``losses=``) and evaluation results (``evaluations=``) can be fixed independently.
* :func:`drive` runs plugins through ``epochs x steps_per_epoch`` steps on that stand-in and
  returns a :class:`Run`: every hook call in order with what it published on the metrics
  channel, and per step the learning rate and hooks.
* :class:`HookRecorder` attaches to any engine (a real GPT run too) and records the same.

A plugin author's test is a few lines::

    from enginekit.testing import drive

    def test_halves_lr_every_step():
        run = drive(MyHalving(), steps_per_epoch=4, lr=1.0)
        assert run.lrs == [1.0, 0.5, 0.25, 0.125]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .engine import Engine
from .hookspec import hookimpl

__all__ = ["HookCall", "HookRecorder", "Run", "StepRecord", "drive", "make_engine"]

STEP_HOOKS = ("before_step", "after_backward", "before_optimizer_step", "after_step")


class StandInModel(nn.Module):
    """One scalar weight per parameter group; ``forward`` scales the (float) inputs by their sum."""

    def __init__(self, param_groups: int = 1) -> None:
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.ones(1)) for _ in range(param_groups))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.float() * sum(self.weights)


def make_engine(
    plugins: Any = (),
    *,
    lr: float | Sequence[float] = 1e-3,
    param_groups: int = 1,
    steps_per_epoch: int = 10,
    batch_size: int = 2,
    seq_len: int = 4,
    losses: Sequence[float] | Callable[[int], float] | None = None,
    evaluations: Mapping[int, Mapping[str, float]] | Callable[[int], Mapping[str, float] | None] | None = None,
    val_batches: int = 2,
    **engine_kwargs: Any,
) -> Engine:
    """A real Engine over the stand-in model, synthetic data and an SGD optimizer.

    ``lr`` is one learning rate for every group or one per group. ``losses`` fixes the training
    loss per step (a list indexed by step, or a function of the step), e.g. to inject a NaN; it
    does not touch evaluations (``engine.evaluate`` keeps the stand-in's own loss). By default
    the loss is a mean-squared error with real, non-zero gradients.

    ``evaluations`` injects evaluation results, independently of the training loss: a mapping
    from step to results (``{4: {"val_loss": 2.0}}``) or a function of the step returning
    results or ``None``. At each such step an evaluator registered by the kit (as ``"evaluator"``)
    reports them through :meth:`Engine.publish_evaluation` from ``after_step``, exactly as
    LossTracker does: the values land on ``engine.metrics`` and ``after_evaluate`` fires.

    ``val_batches=0`` gives no validation loader (``engine.val_loader is None``).
    ``grad_accum_steps`` and other ``Engine`` keywords pass through; each optimizer step
    consumes ``grad_accum_steps`` synthetic micro-batches.
    """
    lrs = [float(lr)] * param_groups if isinstance(lr, (int, float)) else [float(x) for x in lr]
    if len(lrs) != param_groups:
        raise ValueError(f"lr has {len(lrs)} values but param_groups is {param_groups}")
    model = StandInModel(param_groups)
    optimizer = torch.optim.SGD([{"params": [w], "lr": g_lr} for w, g_lr in zip(model.weights, lrs)], lr=lrs[0])
    accum = engine_kwargs.get("grad_accum_steps", 1)
    gen = torch.Generator().manual_seed(0)

    def loader(n_batches: int) -> DataLoader:
        n = n_batches * batch_size
        inputs = torch.randint(0, 10, (n, seq_len), generator=gen)
        return DataLoader(TensorDataset(inputs, 2 * inputs + 1), batch_size=batch_size, shuffle=False)

    engine_kwargs.setdefault("device", "cpu")
    if losses is not None:
        engine_kwargs["loss_fn"] = _fixed_losses(losses, lambda: engine)
    else:
        engine_kwargs.setdefault("loss_fn", _stand_in_loss)
    named_single = isinstance(plugins, tuple) and len(plugins) == 2 and isinstance(plugins[0], str)
    plugin_list = list(plugins) if isinstance(plugins, (list, tuple)) and not named_single else [plugins]
    if evaluations is not None:
        plugin_list.append(("evaluator", _InjectedEvaluations(evaluations)))
    train_loader = loader(steps_per_epoch * accum)
    val_loader = loader(val_batches) if val_batches > 0 else None
    engine = Engine(model, optimizer, train_loader, val_loader, plugins=plugin_list, **engine_kwargs)
    return engine


def _stand_in_loss(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((out - targets.float()) ** 2).mean() * 1e-2


def _fixed_losses(
    losses: Sequence[float] | Callable[[int], float], engine: Callable[[], Engine]
) -> Callable[..., torch.Tensor]:
    def loss_fn(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not engine().model.training:  # an evaluation: the fixed losses are the training loss only
            return _stand_in_loss(out, targets)
        step = engine().state.step
        value = losses(step) if callable(losses) else losses[step]
        # Multiplying by zero keeps the graph (backward works) while the value is the chosen one.
        return out.sum() * 0.0 + value

    return loss_fn


class _InjectedEvaluations:
    """Reports fixed evaluation results at chosen steps, as an evaluating plugin would."""

    def __init__(
        self, evaluations: Mapping[int, Mapping[str, float]] | Callable[[int], Mapping[str, float] | None]
    ) -> None:
        self.evaluations = evaluations

    @hookimpl
    def after_step(self, engine: Engine, loss: Any) -> None:
        step = engine.state.step
        found = self.evaluations(step) if callable(self.evaluations) else self.evaluations.get(step)
        if found is not None:
            engine.publish_evaluation(dict(found))


@dataclass
class HookCall:
    """One emission of a hook: its name, the counters when it fired, who implemented it, and
    what was published on the metrics channel during it.

    Fields: ``hook`` (str), ``step`` and ``epoch`` (int, ``engine.state``'s 0-based counters when
    it fired), ``plugins`` (list of registration names, in call order), ``lr`` (float),
    ``kwargs`` (dict: the hook's arguments but ``engine``) and ``published`` (dict name -> float).
    """

    #: The hook's name.
    hook: str
    #: ``engine.state.step`` when it fired.
    step: int
    #: ``engine.state.epoch`` when it fired (0-based).
    epoch: int
    #: Registration names of the implementations, in call order.
    plugins: list[str]
    #: Parameter group 0's learning rate right after the implementations ran (for ``before_step``:
    #: the base the schedules set, before ``engine.lr_scales``; :attr:`StepRecord.lr` is what the step used).
    lr: float = math.nan
    #: The hook's arguments other than ``engine`` (``batch``, ``loss``, ``metrics``, ``reason``...).
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Metrics published during this call (name -> value as a float), including nested hooks.
    published: dict[str, float] = field(default_factory=dict)


@dataclass
class StepRecord:
    """What happened in one optimizer step: ``lr`` and ``lrs`` are the effective learning rates
    it used (group 0, every group: the schedules' base times ``engine.lr_scales``)."""

    step: int
    epoch: int
    lr: float
    lrs: list[float]
    hooks: list[str] = field(default_factory=list)


class HookRecorder:
    """Records every hook the engine emits, with the plugins called for it in call order.

    Attach to any engine: ``rec = HookRecorder(engine)``; :func:`drive` does it for you. The
    recorded ``lr`` is group 0's learning rate right after the hook's implementations ran; a
    step's learning rates (:attr:`steps`, :attr:`lrs`) are read as ``after_backward`` begins:
    the effective rates (schedules' base times ``engine.lr_scales``) the update uses.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls: list[HookCall] = []
        self._step_lrs: dict[int, list[float]] = {}
        self._open: list[tuple[HookCall, dict[str, Any]]] = []
        self._undo = engine.pm.add_hookcall_monitoring(self._before, self._after)

    def _before(self, hook_name: str, hook_impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, Any]) -> None:
        st = self.engine.state
        args = {k: v for k, v in kwargs.items() if k != "engine"}
        # pluggy calls implementations last-registered first (wrappers, then tryfirst, first).
        call = HookCall(hook_name, st.step, st.epoch, [i.plugin_name for i in reversed(hook_impls)], kwargs=args)
        self.calls.append(call)
        self._open.append((call, self._metric_entries()))
        if hook_name == "after_backward":  # the rates the engine applied for the update, lr_scales included
            self._step_lrs[st.step] = [float(g["lr"]) for g in self.engine.optimizer.param_groups]

    def _metric_entries(self) -> dict[str, Any]:
        metrics = self.engine.metrics
        return {name: metrics.serial(name) for name in metrics}

    def _after(
        self,
        outcome: pluggy.Result[Any],
        hook_name: str,
        hook_impls: Sequence[pluggy.HookImpl],
        kwargs: Mapping[str, Any],
    ) -> None:
        groups = self.engine.optimizer.param_groups
        call, before = self._open.pop()
        now = self._metric_entries()
        call.published = {n: self.engine.metrics[n] for n, v in now.items() if before.get(n) != v}
        call.lr = float(groups[0]["lr"])

    def detach(self) -> None:
        self._undo()

    @property
    def hooks(self) -> list[str]:
        """Hook names in the order they fired."""
        return [c.hook for c in self.calls]

    @property
    def steps(self) -> list[StepRecord]:
        """One record per completed optimizer step, in order."""
        records: dict[int, StepRecord] = {}
        for call in self.calls:
            if call.hook == "before_step":  # a retried (skipped) step replaces its failed attempt
                lrs = self._step_lrs.get(call.step, [call.lr])
                records[call.step] = StepRecord(call.step, call.epoch, lrs[0], lrs)
            if call.hook in STEP_HOOKS:
                records[call.step].hooks.append(call.hook)
        return [r for r in records.values() if "after_step" in r.hooks]

    @property
    def lrs(self) -> list[float]:
        """The learning rate each completed step used (group 0)."""
        return [s.lr for s in self.steps]


@dataclass
class Run:
    """What :func:`drive` saw: the engine afterwards and its :class:`HookRecorder`."""

    #: The stand-in engine after ``fit``: ``run.engine.state``, ``run.engine.metrics``, ``run.engine.plugins``.
    engine: Engine
    #: The recorder that watched every hook; ``calls``, ``hooks``, ``steps``, ``lrs`` below read it.
    recorder: HookRecorder

    @property
    def evaluations(self) -> list[tuple[int, dict[str, float]]]:
        """``(step, metrics)`` of every ``after_evaluate`` emitted, in order."""
        return [(c.step, dict(c.kwargs["metrics"])) for c in self.recorder.calls if c.hook == "after_evaluate"]

    @property
    def calls(self) -> list[HookCall]:
        return self.recorder.calls

    @property
    def hooks(self) -> list[str]:
        return self.recorder.hooks

    @property
    def steps(self) -> list[StepRecord]:
        return self.recorder.steps

    @property
    def lrs(self) -> list[float]:
        return self.recorder.lrs


def drive(
    plugins: Any,
    *,
    epochs: int | None = None,
    steps_per_epoch: int = 10,
    max_steps: int | None = None,
    **make_engine_kwargs: Any,
) -> Run:
    """Run ``plugins`` (one or a list) through ``epochs x steps_per_epoch`` steps on the stand-in engine.

    ``epochs`` and ``max_steps`` mean what they mean for :meth:`Engine.fit` (one epoch by default).

    Exceptions from the plugins propagate exactly as from :meth:`Engine.fit`.
    """
    engine = make_engine(plugins, steps_per_epoch=steps_per_epoch, **make_engine_kwargs)
    recorder = HookRecorder(engine)
    engine.fit(epochs=epochs, max_steps=max_steps)
    return Run(engine, recorder)
