"""The engine: one explicit training loop that emits the hooks of :mod:`enginekit.hookspec`.

Read :meth:`Engine.fit`, then ``_run_epoch``, then ``_train_step`` and ``_update``, top to bottom,
to know the whole flow. Plugins (registry.py), torchrun (distributed.py) and resume bookkeeping
(resume.py) live in modules of their own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .batches import count_tokens, default_forward, to_device, token_weights
from .checks import check_count, check_hyperparameters, check_number, check_optimizer_of
from .compiling import CompiledModules, compile_options
from .distributed import Distributed, resolve_device, set_sampler_epoch
from .errors import NonFiniteLossError, TrainingInterrupted
from .evaluation import mean_loss
from .fsdp import check_strategy
from .hostsync import HostSync
from .log import get_logger
from .metrics import Metrics
from .nonfinite import NonFinitePolicy
from .plan import LRScales, plugin_on_stack
from .precision import Precision
from .registry import Registry
from .resume import DataPosition, engine_state_dict, load_engine_state, loader_state
from .signals import StopSignals
from .state import TrainState, capture_rng

__all__ = ["Engine", "NonFiniteLossError", "TrainingInterrupted", "lm_loss"]

#: where ``Engine.print`` sends plugins' lines for their users
_PRINT = get_logger("enginekit.print")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The language-model loss of the book's ``calc_loss_batch``: cross-entropy over all positions."""
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            "lm_loss, the default loss_fn, expects next-token logits (batch, seq, vocab) and targets "
            f"(batch, seq), got logits {tuple(logits.shape)} and targets {tuple(targets.shape)}; for another "
            "task pass loss_fn (e.g. torch.nn.functional.cross_entropy for classes) and, if the batch is "
            "not (inputs, targets), forward_fn"
        )
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class Engine:
    """Trains ``model`` with ``optimizer`` on ``train_loader``, emitting the hooks of :mod:`enginekit.hookspec`.

    Args:
        model: any ``nn.Module`` mapping the loader's inputs to what ``loss_fn`` takes.
        optimizer: built on ``model``'s parameters; its lr at the start of fit is the default peak.
        train_loader: yields ``(inputs, targets)`` and has a ``len()``.
        val_loader: optional, used by evaluation plugins.
        plugins: plugin objects, ``(name, plugin)`` pairs, or names of installed plugins.
        device: ``"auto"`` (cuda, then mps, then cpu) or anything ``torch.device`` takes.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; default :func:`lm_loss`.
        forward_fn: ``forward_fn(model, batch) -> (outputs, targets)``: how a batch (already on
            the device, tuples, lists and dicts of tensors included) becomes what ``loss_fn``
            takes; also used by ``evaluate``. Default: ``(inputs, targets)`` batches,
            ``model(inputs), targets``. ``tokens_seen`` counts the elements of the batch's
            inputs (see :func:`enginekit.batches.count_tokens`).
        precision: ``"fp32"``, ``"bf16"`` (autocast, CPU and CUDA) or ``"fp16"`` (autocast and a
            GradScaler; for CUDA, on CPU only to test that path).
        grad_accum_steps: micro-batches per optimizer step. With the default ``lm_loss`` each weighs
            by its target tokens (exactly the big batch's gradient); another ``loss_fn`` is averaged.
        nonfinite: ``"error"`` (raise :class:`NonFiniteLossError` before the update) or
            ``"skip"`` (drop the step's update and try the next batch for the same step).
        max_skips: with ``"skip"``, consecutive skipped steps tolerated before raising.
        sync_every: read the loss's finiteness (and, under torchrun, agree on stopping) on the
            host every N steps instead of every step, so CUDA never waits for the device within
            a step; ``None``: 16 on CUDA with ``nonfinite="error"``, 1 otherwise. What a larger
            N changes in the guarantees is in :mod:`enginekit.hostsync`.
        autoload_plugins: also register every installed third-party plugin (entry-point group
            ``enginekit``) not already registered under its name. Off by default: a run only
            runs the plugins it names.
        compile: ``True`` or a dict of ``torch.compile`` arguments (``{"mode": "max-autotune"}``)
            to run training and evaluation forwards through a compiled model; ``engine.model``
            stays the plain module (see :mod:`enginekit.compiling` for what recompiles when).

        strategy: under torchrun, ``"ddp"`` (DistributedDataParallel: every rank holds the whole
            model) or ``"fsdp"`` (``fully_shard`` per transformer block and the root: parameters,
            gradients and optimizer state sharded over ranks; see :mod:`enginekit.fsdp` and
            docs/fsdp.md). Outside torchrun both are the one-process path, unchanged.

    What plugins use: ``state`` (:class:`TrainState`, counters and plan facts), ``metrics``
    (:class:`~enginekit.metrics.Metrics`, the metrics channel), ``lr_scales``
    (:class:`~enginekit.plan.LRScales`, the factors of lr modifiers), ``model``, ``optimizer``,
    ``train_loader``, ``val_loader``, ``device``, ``loss_fn``, ``forward_fn``, ``strategy``, and the
    methods ``name_of``, ``evaluate``, ``publish_evaluation``, ``print``, ``all_true``,
    ``broadcast_from_main`` and ``model_state_dict``. Under FSDP the model is whole on every rank
    during ``after_epoch``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        *,
        plugins: Sequence[Any] = (),
        device: str | torch.device = "auto",
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        forward_fn: Callable[[nn.Module, Any], tuple[Any, Any]] | None = None,
        precision: str = "fp32",
        grad_accum_steps: int = 1,
        nonfinite: str = "error",
        max_skips: int = 10,
        autoload_plugins: bool = False,
        compile: bool | dict[str, Any] = False,
        sync_every: int | None = None,
        strategy: str = "ddp",
    ) -> None:
        check_count("", "grad_accum_steps", grad_accum_steps)
        check_strategy(strategy, precision)
        self.strategy = strategy
        options = compile_options(compile)
        if options is not None and strategy == "fsdp":  # not yet tried: compile per FSDP unit, after sharding
            raise ValueError("compile with strategy='fsdp' is not supported yet; use strategy='ddp' to compile")
        self._compiled = CompiledModules(options, self.print) if options is not None else None
        check_optimizer_of(model, optimizer)
        self._nonfinite = NonFinitePolicy(nonfinite, max_skips)
        self.state = TrainState()
        self.metrics = Metrics()
        #: lr modifiers' factors by owner name: schedules set the base lr, these scale it (see LRScales)
        self.lr_scales = LRScales()
        self.device = resolve_device(device)
        self._sync = HostSync(sync_every, self.device, nonfinite)
        self._held_stop = False  # under torchrun with sync_every > 1: a stop waiting for the next read
        self._precision = Precision(precision, self.device)
        self.precision, self.scaler = precision, self._precision.scaler
        self.grad_accum_steps = grad_accum_steps
        self.loss_fn = loss_fn or lm_loss
        self.forward_fn = forward_fn or default_forward
        self._forward_loss = self._precision.autocasting(self._loss_of)  # fp32: _loss_of itself, no context
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self._dist = Distributed(self.device, strategy, self._precision.dtype)
        self._position = DataPosition()
        self._signals = StopSignals(self.print)
        self.train_loader = self._dist.setup(self.model, self.train_loader, self.state, self.optimizer)

        self._registry = Registry(self)
        self.pm, self.hook = self._registry.pm, self._registry.hook
        self._registry.register_all(plugins, autoload=autoload_plugins)
        self.state._whose_code = lambda: plugin_on_stack(self.pm)  # names the owners of a plan fact
        #: ``_emit(hook_name, **kwargs)`` calls a hook's implementations (see ``Registry.emit``)
        self._emit = self._registry.emit

    #: ``Engine.pick_device("auto")`` resolves a device the way the engine does.
    pick_device = staticmethod(resolve_device)

    def register(self, plugin: Any, name: str | None = None) -> Any:
        """Register a plugin object (or an installed plugin by its entry-point name) and validate it now."""
        return self._registry.register(plugin, name)

    @property
    def plugins(self) -> dict[str, Any]:
        """Registered plugins by registration name, in registration order."""
        return self._registry.plugins

    def name_of(self, plugin: Any) -> str:
        """``plugin``'s registration name (a plugin passes ``self``: the key of its ``lr_scales``
        factor, its ``lr_decay`` value, its entry in checkpoints)."""
        name = self.pm.get_name(plugin)
        if name is None:
            raise ValueError(f"{plugin!r} is not registered with this engine; register it first (Engine(plugins=...))")
        return name

    # ------------------------------------------------------------------ the loop

    def fit(self, epochs: int | None = None, max_steps: int | None = None) -> TrainState:
        """Train for ``epochs`` epochs (default 1) or ``max_steps`` optimizer steps, whichever ends first."""
        st = self.state
        # again after a previous fit
        self.train_loader = self._dist.setup(self.model, self.train_loader, st, self.optimizer)
        try:
            self._plan(epochs, max_steps)
            with self._signals.installed():
                try:
                    self._emit("before_fit")
                    self._stop_if_signalled()  # a signal during set-up or resume loading
                    while st.epoch < st.epochs and st.step < st.total_steps and not st.should_stop:
                        self._run_epoch()
                        self._stop_if_signalled()  # a signal during after_epoch
                    self._emit("after_fit")
                    self._stop_if_signalled()  # even during after_fit: the run says it was stopped
                except BaseException as error:
                    self._emit_exception(error)
                    raise
        finally:
            self._dist.teardown()
        return st

    def _plan(self, epochs: int | None, max_steps: int | None) -> None:
        """Set this fit's totals and reset the plan facts plugins publish in ``before_fit``."""
        st = self.state
        if epochs is not None:
            check_count("fit: ", "epochs", epochs)
        if max_steps is not None:
            check_count("fit: ", "max_steps", max_steps)
        for i, group in enumerate(self.optimizer.param_groups):
            check_number("optimizer: ", f"param group {i}'s lr", group["lr"], minimum=0.0)
        check_hyperparameters(self.optimizer)
        st.steps_per_epoch = self._steps_per_epoch()
        if epochs is None:
            epochs = 1 if max_steps is None else math.ceil(max_steps / st.steps_per_epoch)
        st.epochs = epochs
        st.total_steps = (
            epochs * st.steps_per_epoch if max_steps is None else min(max_steps, epochs * st.steps_per_epoch)
        )
        if st.step >= st.total_steps:
            raise ValueError(
                f"nothing to train: this engine has done {st.step} steps and the plan is {st.total_steps}; "
                "pass a larger epochs or max_steps to continue"
            )
        st.should_stop = False
        st.reset_plan()
        # torch's schedulers keep each group's first lr as ``initial_lr``: a second fit plans from it too
        st.peak_lrs = [float(g.setdefault("initial_lr", g["lr"])) for g in self.optimizer.param_groups]
        self.metrics.step = st.step - 1

    def _run_epoch(self) -> None:
        st = self.state
        self.model.train()  # as the book's loop does each epoch; evaluation and samples switch back
        set_sampler_epoch(self.train_loader, st.epoch)
        self._emit("before_epoch")
        batches = self._position.epoch_batches(self.train_loader)
        exhausted = False
        while st.step < st.total_steps and not st.should_stop:
            micro_batches = list(islice(batches, self.grad_accum_steps))
            if not micro_batches:
                exhausted = True
                break
            st.batches_in_epoch += len(micro_batches)
            if not self._train_step(micro_batches):
                continue  # skipped for a non-finite loss: the same step again with the next batch
            read_now = self._sync.due(st.step)  # every step unless sync_every > 1
            if read_now:  # before the save point: every rank must decide to save alike
                self._read_device()
            elif self._dist.active:  # ranks leave the loop together, at the next read
                self._held_stop, st.should_stop = self._held_stop or st.should_stop, False
            self._save_point("step")
            if self._signals.received is not None and (read_now or not self._dist.active):
                self._stop_if_signalled()
        if self._sync.deferred:  # the epoch's last steps are read before anything reports on them
            self._read_device()
        with self._dist.gathered(self.model):  # FSDP: a plugin may run the model on rank 0 alone (a sample)
            self._emit("after_epoch")
        if exhausted or st.batches_in_epoch >= len(self.train_loader):  # type: ignore[arg-type]
            st.epoch += 1
            st.step_in_epoch = st.batches_in_epoch = 0
        else:  # cut short (max_steps, should_stop): a later fit continues this epoch's data order
            self._position.cut_short(st.batches_in_epoch)
        self._save_point("epoch")

    def _save_point(self, reason: str) -> None:
        """Emit ``on_save_point``; a plugin that assigns a counter there fails, named (save points only write out)."""
        with self.state.read_only("on_save_point"):
            self._emit("on_save_point", reason=reason)

    def _read_device(self) -> None:
        """The host reads what the device kept: the deferred finite check, then (torchrun) the stop agreement."""
        st = self.state
        self._sync.check(st.step)
        if self._dist.active:
            self._signals.received, st.should_stop = self._dist.agree_on_stop(
                self._signals.received, st.should_stop or self._held_stop
            )
            self._held_stop = False

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a loss not yet read on the host was not finite.

        Free unless ``sync_every > 1``; a plugin that writes the training state out (a
        checkpoint) calls it first, so nothing trained on a non-finite loss is ever persisted.
        """
        self._sync.check(self.state.step)

    def _stop_if_signalled(self) -> None:
        """After SIGINT/SIGTERM: a save point (a checkpoint of the last finished step if it lacks one), then stop."""
        if self._signals.received is not None:
            self._save_point("signal")
            raise TrainingInterrupted(self._signals.received, self.state.step)

    def _train_step(self, micro_batches: list[Any]) -> bool:
        """One optimizer step; False when the non-finite policy skipped it."""
        st, opt, metrics = self.state, self.optimizer, self.metrics
        metrics.step = st.step
        self._emit("before_step", batch=micro_batches[0] if self.grad_accum_steps == 1 else micro_batches)
        # 0. lr modifiers scale what the schedules set; the base goes back after the step (no compounding)
        base_lrs = self.lr_scales.apply(opt.param_groups) if self.lr_scales.active else None
        metrics._put("lr", opt.param_groups[0]["lr"], st.step)
        try:
            return self._update(micro_batches)
        finally:
            if base_lrs is not None:
                self.lr_scales.restore(opt.param_groups, base_lrs)

    def _update(self, micro_batches: list[Any]) -> bool:
        """Forward, backward, checks and the update of one step whose lr is set; False when skipped."""
        st, opt, metrics = self.state, self.optimizer, self.metrics
        # 1. forward + backward per micro-batch; the loss is averaged so gradients equal the big batch's
        loss, tokens = self._forward_backward(micro_batches)
        if self._compiled is not None and self._compiled.first_step_pending:
            self._compiled.first_step_pending = False
            self.print("torch.compile: compiled; training goes on")
        if self._dist.active:  # every rank then logs, and judges finiteness on, the same number
            loss = self._dist.mean(loss)
        # 2. unscale fp16 gradients so after_backward sees true magnitudes
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        # 3. a non-finite loss never reaches the weights (the step's one host read; free on CPU);
        #    with sync_every > 1 the device keeps the check and the host reads it every N steps
        if self._sync.deferred:
            self._sync.note(loss)
        elif not math.isfinite(loss.item()):
            self._nonfinite.skip_or_raise(loss, st, opt, self.scaler, self.print)
            return False
        st.skipped_steps = 0
        # 3b. fp16: gradients that overflowed although the loss was finite: GradScaler lowers its
        #     scale and the step is not taken, so it is not counted either (retried with the next batch)
        if self.scaler is not None and self._precision.overflowed(opt):
            self.scaler.update()
            opt.zero_grad(set_to_none=True)
            return False
        metrics._put("step_loss", loss, st.step)
        self._emit("after_backward")  # readers: gradients as backward left them, in every order
        self._emit("before_optimizer_step")  # writers: clipping, after every reader
        # 4. update, then free the gradients
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        # 5. the step is done: the plugins' bookkeeping, then the counters move to the next step
        st.tokens_seen += tokens * st.world_size
        self._emit("after_step", loss=loss)
        st.step += 1
        st.step_in_epoch += 1
        return True

    def _forward_backward(self, micro_batches: list[Any]) -> tuple[torch.Tensor, int]:
        n = len(micro_batches)
        if n == 1 and not self._dist.active:  # no accumulation: the usual step, on the shortest path
            batch = to_device(micro_batches[0], self.device)
            return self._backward(batch, 1).detach(), count_tokens(batch)
        batches = [to_device(batch, self.device) for batch in micro_batches]
        weights = self._token_weights(batches)
        total: torch.Tensor | None = None
        tokens = 0
        for i, batch in enumerate(batches):
            weight = None if weights is None else weights[i]
            if self._dist.active and i < n - 1:  # DDP/FSDP reduce gradients on the last micro-batch only
                with self._dist.no_sync():
                    loss = self._backward(batch, n, weight)
            else:
                loss = self._backward(batch, n, weight)
            total = loss.detach() if total is None else total + loss.detach()
            tokens += count_tokens(batch)
        assert total is not None
        return total, tokens

    def _token_weights(self, batches: list[Any]) -> torch.Tensor | None:
        """Each micro-batch's share of the step's target tokens (see :func:`~enginekit.batches.token_weights`);
        None unless the loss is the default lm_loss on ``(inputs, targets)`` batches."""
        if self.loss_fn is not lm_loss or self.forward_fn is not default_forward:
            return None
        return token_weights(batches, self.state.world_size, self._dist.mean if self._dist.active else None)

    def _backward(self, batch: Any, n: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """One micro-batch: forward and loss (under autocast in bf16/fp16), weighted by its share of
        the step's target tokens (or averaged over ``n``), backward."""
        loss = self._forward_loss(self._training_module(), batch)
        if weight is not None:
            loss = loss * weight.to(loss.dtype)
        elif n > 1:
            loss = loss / n
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss

    def _training_module(self) -> nn.Module:
        module = self._dist.ddp or self.model
        return module if self._compiled is None else self._compiled.of(module)

    def eval_module(self) -> nn.Module:
        """What evaluation runs: ``engine.model``, or its compiled wrapper with ``compile=``."""
        return self.model if self._compiled is None else self._compiled.of(self.model)

    def _loss_of(self, model: nn.Module, batch: Any) -> torch.Tensor:
        outputs, targets = self.forward_fn(model, batch)
        return self.loss_fn(outputs, targets)

    def _steps_per_epoch(self) -> int:
        try:
            n = len(self.train_loader)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("train_loader must have a len() so the engine can plan total_steps") from None
        if n == 0:
            raise ValueError(
                "train_loader is empty: no training batch (is the text shorter than the context, "
                "or drop_last=True with fewer windows than batch_size?)"
            )
        return math.ceil(n / self.grad_accum_steps)

    def _emit_exception(self, error: BaseException) -> None:
        try:
            self.hook.on_exception(engine=self, error=error)
        except Exception as hook_error:
            warnings.warn(f"a plugin failed in on_exception while handling {error!r}: {hook_error!r}", stacklevel=2)

    # ------------------------------------------------------------------ evaluation and output

    def evaluate(self, loader: Iterable[Any], max_batches: int | None = None) -> float:
        """Mean loss over the first ``max_batches`` batches of ``loader`` (all when None), in eval mode.

        As the book's ``calc_loss_loader``: per-batch losses summed as Python floats, NaN for an
        empty loader; train mode is restored afterwards. Under torchrun the mean is over ranks.
        """
        mean = mean_loss(self, loader, max_batches)
        if self._dist.active:
            mean = float(self._dist.mean(torch.tensor(mean, device=self.device)))
        return mean

    def publish_evaluation(self, results: dict[str, float]) -> dict[str, float]:
        """Publish an evaluation's results on the metrics channel, then emit ``after_evaluate``.

        Whoever evaluates (LossTracker, your own plugin) calls this once per evaluation, so every
        plugin that reacts to validation results sees them in the same step, in any order.
        """
        results = {name: float(value) for name, value in results.items()}
        for name, value in results.items():
            self.metrics.publish(name, value)
        self._emit("after_evaluate", metrics=dict(results))
        return results

    def print(self, message: str) -> None:
        """Show a line on the main process, above any progress bar: an info record of the
        ``enginekit.print`` logger (see :mod:`enginekit.log`)."""
        if self.state.is_main:
            _PRINT.info(message)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's ``state_dict()``; under FSDP gathered from the shards onto the CPU of
        every rank (every rank must call it). The book's keys and shapes in every strategy."""
        return self._dist.model_state_dict(self.model)

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank; every rank must call it (outside torchrun: ``flag``)."""
        return self._dist.all_true(flag)

    def broadcast_from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank; every rank must call it (outside torchrun: ``obj``)."""
        return self._dist.broadcast(obj)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Where the run stands, as tensors and plain values: counters, RNGs, scaler, data position,
        the metrics channel. Call it at a save point (between steps)."""
        loader = loader_state(self.train_loader)  # a loader that keeps its own position: stored, not replayed
        return engine_state_dict(
            self.state,
            self._position,
            self._dist.gather(capture_rng(), self.state.world_size),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            metrics=self.metrics.state_dict(),
            lr_scales=self.lr_scales.state_dict(),
            **({} if loader is None else {"loader": self._dist.gather(loader, self.state.world_size)}),
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the next steps continue exactly where it stood."""
        load_engine_state(self.state, self._position, state)
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.metrics.load_state_dict(state.get("metrics", {}))
        self.lr_scales.load_state_dict(state.get("lr_scales", {}))
        self.metrics.step = self.state.step - 1
