"""Any ``torch.optim.lr_scheduler`` as a plugin: a whole schedule, or a factor on top of one."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.optim.lr_scheduler import LRScheduler as TorchLRScheduler
from torch.optim.lr_scheduler import ReduceLROnPlateau as TorchReduceLROnPlateau

from enginekit import Engine, TrainState
from enginekit.hookspec import hookimpl

ROLES = ("schedule", "modifier")
#: torch warns when a scheduler steps before its optimizer ever did: true after a resume, and for
#: the stand-in optimizer of a modifier, which never steps. Neither is the mistake it warns of.
_EARLY_STEP_WARNING = r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"

Factory = Callable[[torch.optim.Optimizer, TrainState], Any]


class LRScheduler:
    """Drive a torch learning-rate scheduler once per optimizer step (or per evaluation).

    Args:
        factory: ``factory(optimizer, state) -> scheduler``, called once, in the first fit's
            ``before_fit`` (``state.total_steps`` is final there), e.g.
            ``lambda opt, st: OneCycleLR(opt, max_lr=1e-3, total_steps=st.total_steps)``.
        role: ``"schedule"``: the scheduler drives the real optimizer and sets the base lr of
            every step (it owns the whole curve: it publishes ``state.lr_decay`` and refuses a
            warmup published by another plugin; put a warmup inside it, e.g. with
            ``SequentialLR``, or use ``"modifier"``). ``"modifier"``: it runs on a stand-in
            optimizer whose groups start at lr 1.0, and its lr there is a factor in
            ``engine.lr_scales``, multiplied into whatever the schedules set (LRWarmup,
            CosineDecay, ...) in every registration order: ``LambdaLR`` gives
            ``lambda(step)``, ``ReduceLROnPlateau`` a plateau reduction.
        monitor: for torch's ``ReduceLROnPlateau`` (a modifier): the evaluation metric it is
            stepped with, in ``after_evaluate``, instead of once per step.

    Step ``s`` uses the scheduler's lr after ``s`` calls of ``scheduler.step()``, as the usual
    ``optimizer.step(); scheduler.step()`` loop gives. The scheduler's state (and the stand-in's
    rates) travel with checkpoints; a resumed run continues it exactly. A scheduler that also
    changes momentum (``OneCycleLR``'s ``cycle_momentum``) changes an optimizer setting that
    ``Checkpoint`` compares on resume: pass ``cycle_momentum=False`` or resume with
    ``allow_changes=True``.
    """

    def __init__(
        self, factory: Factory, role: Literal["schedule", "modifier"] = "schedule", monitor: str | None = None
    ) -> None:
        if not callable(factory):
            raise ValueError(f"LRScheduler: factory must be callable as factory(optimizer, state), got {factory!r}")
        if role not in ROLES:
            raise ValueError(f"LRScheduler: role must be one of {ROLES}, got {role!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"LRScheduler: monitor must be a metric name or None, got {monitor!r}")
        if monitor is not None and role != "modifier":
            raise ValueError(
                "LRScheduler: monitor (a ReduceLROnPlateau fed from evaluations) needs role='modifier', so the "
                "schedules' next before_step does not overwrite its reduction"
            )
        self.factory = factory
        self.role = role
        self.monitor = monitor
        self.scheduler: Any = None
        self._shadow: torch.optim.Optimizer | None = None
        self._pending: dict[str, Any] | None = None
        self._quiet_next = True

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        if self.role == "schedule":
            engine.state.lr_decay = engine.name_of(self)  # owns the curve: a second decay is refused
        if self.scheduler is None:
            self._build(engine)

    def _build(self, engine: Engine) -> None:
        groups = engine.optimizer.param_groups
        if self.role == "modifier":
            params = [{"params": [torch.zeros(1, requires_grad=True)], "lr": 1.0} for _ in groups]
            self._shadow = torch.optim.SGD(params, lr=1.0)
        target = self._shadow if self._shadow is not None else engine.optimizer
        scheduler = self.factory(target, engine.state)
        if not isinstance(scheduler, TorchLRScheduler):
            raise ValueError(
                f"LRScheduler: factory returned {type(scheduler).__name__}, not a torch.optim.lr_scheduler scheduler"
            )
        plateau = isinstance(scheduler, TorchReduceLROnPlateau)
        if plateau and self.monitor is None:
            raise ValueError(
                "LRScheduler: a ReduceLROnPlateau steps with an evaluation metric: pass monitor='val_loss' "
                "(or your metric) and role='modifier'"
            )
        if self.monitor is not None and not plateau:
            raise ValueError(
                f"LRScheduler: monitor is for ReduceLROnPlateau; {type(scheduler).__name__} steps per step"
            )
        if scheduler.optimizer is not target:
            raise ValueError("LRScheduler: factory must build the scheduler on the optimizer it is given")
        self.scheduler, self._quiet_next = scheduler, True
        if self._pending is not None:  # state restored before the scheduler existed
            self._load(self._pending)
            self._pending = None

    @hookimpl
    def before_step(self, engine: Engine, batch: Any) -> None:
        st = engine.state
        if self.role == "schedule" and st.warmup_steps:
            raise ValueError(
                f"LRScheduler: as a schedule it sets the lr of every step, but a warmup of {st.warmup_steps} steps "
                "is published too; use role='modifier' to scale the warmup's lr, or build the warmup into the "
                "torch scheduler (SequentialLR)"
            )
        if self.monitor is None:
            while self.scheduler.last_epoch < st.step:
                self._step()
        if self._shadow is not None:
            self._publish_factor(engine)

    @hookimpl
    def after_evaluate(self, engine: Engine, metrics: dict[str, float]) -> None:
        if self.monitor is None or self.monitor not in metrics:
            return
        self._step(float(metrics[self.monitor]))
        self._publish_factor(engine)

    def _step(self, *value: float) -> None:
        if self._quiet_next:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_EARLY_STEP_WARNING, category=UserWarning)
                self.scheduler.step(*value)
            self._quiet_next = False
        else:
            self.scheduler.step(*value)

    def _publish_factor(self, engine: Engine) -> None:
        assert self._shadow is not None
        factors = [float(g["lr"]) for g in self._shadow.param_groups]
        name = engine.name_of(self)
        if all(f == 1.0 for f in factors):
            engine.lr_scales.pop(name, None)  # a factor of one: leave the step untouched
        else:
            engine.lr_scales[name] = factors[0] if len(set(factors)) == 1 else factors

    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is None:
            return dict(self._pending) if self._pending is not None else {}
        state: dict[str, Any] = {"scheduler": _plain(self.scheduler.state_dict())}
        if self._shadow is not None:
            state["factors"] = [float(g["lr"]) for g in self._shadow.param_groups]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is None:
            self._pending = dict(state)
        else:
            self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.scheduler.load_state_dict(state["scheduler"])
        self._quiet_next = True
        if self._shadow is not None:
            for group, factor in zip(self._shadow.param_groups, state["factors"]):
                group["lr"] = factor


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    """A scheduler's state without what ``weights_only`` loading refuses (a function kept as state)."""
    return {k: v for k, v in state.items() if not callable(v)}
