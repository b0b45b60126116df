"""The engine: a pluggy plugin manager around one explicit training loop.

Read :meth:`Engine.fit` top to bottom to know the whole flow; everything optional happens in
plugins through the hooks of :mod:`enginekit.hookspec`.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import re
import signal
import threading
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pluggy
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from . import hookspec
from .state import TrainState, capture_rng, restore_rng

__all__ = [
    "Engine",
    "NonFiniteLossError",
    "PluginError",
    "PluginValueError",
    "TrainingInterrupted",
    "lm_loss",
]

HOOK_NAMES = (
    "before_fit",
    "before_epoch",
    "before_step",
    "after_backward",
    "after_step",
    "after_epoch",
    "after_fit",
    "on_exception",
)
PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("error", "skip")


class PluginError(RuntimeError):
    """A plugin's hook raised; the message names the plugin and the hook, ``__cause__`` is the original."""

    def __init__(self, message: str, plugin_name: str, hook_name: str) -> None:
        super().__init__(message)
        self.plugin_name = plugin_name
        self.hook_name = hook_name


class PluginValueError(PluginError, ValueError):
    """A plugin rejected a setting (it raised ``ValueError``); still catchable as ``ValueError``."""


_PLUGIN_ERROR_CLASSES: dict[type, type] = {ValueError: PluginValueError}


def _plugin_error_class(original: type[Exception]) -> type[PluginError]:
    """A PluginError that is also an instance of the original type, so ``except ValueError``
    (or ``except CheckpointError``) around ``fit`` still catches what a plugin raised."""
    cls = _PLUGIN_ERROR_CLASSES.get(original)
    if cls is None:
        try:
            cls = type(f"Plugin{original.__name__}", (PluginError, original), {"__module__": __name__})
        except TypeError:  # incompatible layouts (e.g. OSError subclasses)
            cls = PluginValueError if issubclass(original, ValueError) else PluginError
        _PLUGIN_ERROR_CLASSES[original] = cls
    return cls


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite under the ``error`` policy, or too many steps were skipped."""


class TrainingInterrupted(SystemExit):
    """SIGINT or SIGTERM stopped ``fit`` after a finished step.

    A ``SystemExit`` whose code is ``128 + signal number`` (130 for SIGINT, 143 for SIGTERM), so
    a script that does not catch it exits with the shell's conventional status.
    """

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.step = step
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return f"training interrupted by {signal.Signals(self.signum).name} after {self.step} completed step(s)"


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The language-model loss of the book's ``calc_loss_batch``: cross-entropy over all positions."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def default_plugin_name(plugin: object) -> str:
    """``plugin.plugin_name`` if set, else the class name in snake_case (``LRWarmup`` -> ``lr_warmup``)."""
    explicit = getattr(plugin, "plugin_name", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    if isinstance(plugin, types.ModuleType):
        raw = plugin.__name__.rsplit(".", 1)[-1]
    else:
        raw = plugin.__name__ if isinstance(plugin, type) else type(plugin).__name__
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", raw).lower()


class _PluginManager(pluggy.PluginManager):
    """Treats a public method named exactly like a hook as an implementation even without
    ``@hookimpl`` (as pytest does), so forgetting the decorator is never a silent no-op."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name in HOOK_NAMES and callable(getattr(plugin, name, None)):
            opts = dict(
                wrapper=False, hookwrapper=False, optionalhook=False, tryfirst=False, trylast=False, specname=None
            )
        return opts


def _resolve_device(device: str | torch.device) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if str(device) != "auto":
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device {device!r} is not a device torch knows: {exc}; try 'auto', 'cpu', 'cuda'"
            ) from exc
        # under torchrun a bare "cuda" means this process's GPU, not GPU 0 for every rank
        return torch.device("cuda", local_rank) if resolved.type == "cuda" and resolved.index is None else resolved
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
        precision: ``"fp32"``, ``"bf16"`` (autocast, CPU and CUDA) or ``"fp16"`` (CUDA, GradScaler).
        grad_accum_steps: micro-batches per optimizer step; the loss is averaged over them.
        nonfinite: ``"error"`` (raise :class:`NonFiniteLossError` before the update) or
            ``"skip"`` (drop the step's update and try the next batch for the same step).
        max_skips: with ``"skip"``, consecutive skipped steps tolerated before raising.
        autoload_plugins: also register every installed plugin (entry-point group
            ``enginekit``) not already registered under its name. Off by default: a run only
            runs the plugins it names.
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
        precision: str = "fp32",
        grad_accum_steps: int = 1,
        nonfinite: str = "error",
        max_skips: int = 10,
        autoload_plugins: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if max_skips < 1:
            raise ValueError(f"max_skips must be >= 1, got {max_skips}")
        self.state = TrainState()
        self.device = _resolve_device(device)
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"precision='fp16' needs a CUDA device (GradScaler), but the device is {self.device}; "
                "use precision='bf16' on CPU"
            )
        self.precision = precision
        self.grad_accum_steps = grad_accum_steps
        self.nonfinite = nonfinite
        self.max_skips = max_skips
        self.loss_fn = loss_fn or lm_loss
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self._amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self._ddp: nn.Module | None = None
        self._owns_process_group = False
        self._resume: dict[str, Any] | None = None
        self._epoch_rng: torch.Tensor | None = None
        self._in_after_step = False
        self._stop_signal: int | None = None

        self._setup_distributed()
        self.pm = _PluginManager(hookspec.PROJECT)
        self.pm.add_hookspecs(hookspec)
        self.hook = self.pm.hook
        for plugin in plugins:
            if isinstance(plugin, tuple):
                self.register(plugin[1], name=plugin[0])
            else:
                self.register(plugin)
        if autoload_plugins:
            from .discovery import installed_plugins

            for ep_name in installed_plugins():
                if self.pm.get_plugin(ep_name) is None:
                    self.register(ep_name)

    #: ``Engine.pick_device("auto")`` resolves a device the way the engine does.
    pick_device = staticmethod(_resolve_device)

    # ------------------------------------------------------------------ plugins

    def register(self, plugin: Any, name: str | None = None) -> Any:
        """Register a plugin object (or an installed plugin by its entry-point name) and validate it now."""
        if isinstance(plugin, str):
            from .discovery import load_plugin

            name = name or plugin
            plugin = load_plugin(plugin)
        if isinstance(plugin, type):
            raise TypeError(f"plugin {plugin.__name__} is a class; register an instance: {plugin.__name__}(...)")
        name = name or default_plugin_name(plugin)
        if self.pm.get_plugin(name) is not None:
            raise ValueError(
                f"a plugin named {name!r} is already registered ({type(self.pm.get_plugin(name)).__name__}); "
                f"give the second one its own name: engine.register(plugin, name='{name}_2') or "
                f"Engine(plugins=[('{name}_2', plugin)])"
            )
        if self.pm.is_registered(plugin):
            raise ValueError(f"plugin {plugin!r} is already registered as {self.pm.get_name(plugin)!r}")
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            signatures = "; ".join(f"{h}({', '.join(getattr(self.hook, h).spec.argnames)})" for h in HOOK_NAMES)
            raise ValueError(
                f"plugin {name!r} cannot be registered: {exc}. A hook implementation may take any "
                f"subset of its hook's arguments: {signatures}"
            ) from exc
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise ValueError(self._unknown_hook_message(name, plugin)) from exc
        return plugin

    def _unknown_hook_message(self, name: str, plugin: Any) -> str:
        bad = [
            hook_name
            for hook_name in dir(plugin)
            if not hook_name.startswith("_")
            and hook_name not in HOOK_NAMES
            and super(_PluginManager, self.pm).parse_hookimpl_opts(plugin, hook_name) is not None
        ]
        parts = []
        for hook_name in bad:
            close = difflib.get_close_matches(hook_name, HOOK_NAMES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parts.append(f"{hook_name!r}{hint}")
        return f"plugin {name!r} implements unknown hook(s) {', '.join(parts)}; the hooks are {', '.join(HOOK_NAMES)}"

    @property
    def plugins(self) -> dict[str, Any]:
        """Registered plugins by registration name, in registration order."""
        return dict(self.pm.list_name_plugin())

    def find_plugin(self, kind: type) -> Any | None:
        """The first registered plugin that is an instance of ``kind``, or ``None``."""
        for _, plugin in self.pm.list_name_plugin():
            if isinstance(plugin, kind):
                return plugin
        return None

    def _emit(self, hook_name: str, **kwargs: Any) -> None:
        try:
            getattr(self.hook, hook_name)(engine=self, **kwargs)
        except PluginError:
            raise
        except Exception as exc:
            raise self._plugin_error(hook_name, exc) from exc

    def _plugin_error(self, hook_name: str, exc: Exception) -> PluginError:
        """Name the plugin whose hook raised, found by matching the traceback's frames."""
        impls = {
            getattr(impl.function, "__code__", None): impl.plugin_name
            for impl in getattr(self.hook, hook_name).get_hookimpls()
        }
        plugin_name = "<unknown>"
        tb = exc.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code in impls:
                plugin_name = impls[tb.tb_frame.f_code]
                break
            tb = tb.tb_next
        message = (
            f"plugin {plugin_name!r} failed in hook {hook_name!r} at step {self.state.step} "
            f"(epoch {self.state.epoch}): {type(exc).__name__}: {exc}"
        )
        try:
            return _plugin_error_class(type(exc))(message, plugin_name, hook_name)
        except Exception:  # an exception type whose constructor needs other arguments
            return PluginError(message, plugin_name, hook_name)

    # ------------------------------------------------------------------ the loop

    def fit(self, epochs: int | None = None, max_steps: int | None = None) -> TrainState:
        """Train for ``epochs`` epochs (default 1) or ``max_steps`` optimizer steps, whichever ends first."""
        st = self.state
        self._setup_distributed()  # again after a previous fit tore the process group down
        st.steps_per_epoch = self._steps_per_epoch()
        if epochs is None:
            epochs = 1 if max_steps is None else math.ceil(max_steps / st.steps_per_epoch)
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        st.epochs = epochs
        st.total_steps = (
            epochs * st.steps_per_epoch if max_steps is None else min(max_steps, epochs * st.steps_per_epoch)
        )
        if st.step >= st.total_steps:
            self._teardown_distributed()
            raise ValueError(
                f"nothing to train: this engine has done {st.step} steps and the plan is {st.total_steps}; "
                "pass a larger epochs or max_steps to continue"
            )
        st.should_stop = False
        try:
            with self._signals_stop_after_step():
                try:
                    self._emit("before_fit")
                    while st.epoch < st.epochs and st.step < st.total_steps and not st.should_stop:
                        self._run_epoch()
                    self._emit("after_fit")
                except BaseException as error:
                    self._emit_exception(error)
                    raise
        finally:
            self._teardown_distributed()
        return st

    def _run_epoch(self) -> None:
        st = self.state
        self.model.train()  # as the book's loop does each epoch; evaluation and samples switch back
        self._set_sampler_epoch(st.epoch)
        self._emit("before_epoch")
        batches = self._epoch_batches()
        exhausted = False
        while st.step < st.total_steps:
            micro_batches = [b for _, b in zip(range(self.grad_accum_steps), batches)]
            if not micro_batches:
                exhausted = True
                break
            st.batches_in_epoch += len(micro_batches)
            self._train_step(micro_batches)
            if self._ddp is not None:
                self._agree_on_stop()
            if self._stop_signal is not None:
                raise TrainingInterrupted(self._stop_signal, st.step)
            if st.should_stop:
                break
        self._emit("after_epoch")
        if exhausted or st.batches_in_epoch >= len(self.train_loader):  # type: ignore[arg-type]
            st.epoch += 1
            st.step_in_epoch = st.batches_in_epoch = 0
        else:  # cut short (max_steps, should_stop): a later fit continues this epoch's data order
            self._resume = {"epoch_rng": self._epoch_rng, "batches_in_epoch": st.batches_in_epoch, "rng": capture_rng()}

    def _train_step(self, micro_batches: list[Any]) -> None:
        st, opt = self.state, self.optimizer
        self._emit("before_step", batch=micro_batches[0] if self.grad_accum_steps == 1 else micro_batches)

        # 1. forward + backward per micro-batch; the loss is averaged so gradients equal the big batch's
        loss, tokens = self._forward_backward(micro_batches)
        if self._ddp is not None:  # every rank then logs, and judges finiteness on, the same number
            loss = self._all_reduce_mean(loss)
        # 2. unscale fp16 gradients so after_backward sees true magnitudes
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        # 3. a non-finite loss never reaches the weights
        if not self._loss_is_finite(loss):
            return
        self._emit("after_backward")
        # 4. update, then free the gradients
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        # 5. the step is done: counters, then the plugins' bookkeeping
        st.tokens_seen += tokens * st.world_size
        self._in_after_step = True
        try:
            self._emit("after_step", loss=loss)
        finally:
            self._in_after_step = False
        st.step += 1
        st.step_in_epoch += 1

    def _forward_backward(self, micro_batches: list[Any]) -> tuple[torch.Tensor, int]:
        n = len(micro_batches)
        forward = self._ddp or self.model
        total: torch.Tensor | None = None
        tokens = 0
        for i, (inputs, targets) in enumerate(micro_batches):
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            # DDP all-reduces gradients on the last micro-batch only
            sync = self._ddp.no_sync() if self._ddp is not None and i < n - 1 else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss = self.loss_fn(forward(inputs), targets)
                if n > 1:
                    loss = loss / n
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
            tokens += inputs.numel()
        assert total is not None
        return total, tokens

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        """Apply the non-finite policy: the one host read of the step (free on CPU)."""
        st = self.state
        if bool(torch.isfinite(loss)):
            st.skipped_steps = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        where = f"at step {st.step} (epoch {st.epoch}, batch {st.batches_in_epoch} of the epoch)"
        if self.nonfinite == "error":
            raise NonFiniteLossError(
                f"training loss is {loss.item()} {where}; stopped before the update, so weights, "
                "optimizer and checkpoints hold the last finite state. Lower the learning rate, "
                "check the data, or pass nonfinite='skip'"
            )
        st.skipped_steps += 1
        if self.scaler is not None:
            self.scaler.update()  # closes this step's unscale_ (and lowers the scale if grads overflowed)
        self.print(f"enginekit: non-finite loss {where}: skipped ({st.skipped_steps}/{self.max_skips})")
        if st.skipped_steps >= self.max_skips:
            raise NonFiniteLossError(
                f"{st.skipped_steps} consecutive steps had a non-finite loss, the last {where}; giving up"
            )
        return False

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._amp_dtype)

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

    def _epoch_batches(self) -> Iterator[Any]:
        """The epoch's batches; on resume, replay the epoch's shuffle and skip what was consumed."""
        resume, self._resume = self._resume, None
        if resume is None:
            self._epoch_rng = torch.get_rng_state()
            return iter(self.train_loader)
        if resume["epoch_rng"] is not None:
            torch.set_rng_state(resume["epoch_rng"])
        self._epoch_rng = torch.get_rng_state()
        batches = iter(self.train_loader)
        for _ in range(resume["batches_in_epoch"]):
            next(batches)
        restore_rng(resume["rng"])
        return batches

    def _emit_exception(self, error: BaseException) -> None:
        try:
            self.hook.on_exception(engine=self, error=error)
        except Exception as hook_error:
            warnings.warn(f"a plugin failed in on_exception while handling {error!r}: {hook_error!r}", stacklevel=2)

    @contextlib.contextmanager
    def _signals_stop_after_step(self) -> Iterator[None]:
        """SIGINT/SIGTERM: finish the current step, then raise TrainingInterrupted; a second one aborts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.print(f"enginekit: {signal.Signals(signum).name} received, stopping after the current step")

        self._stop_signal = None
        for s in previous:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------ evaluation and output

    def evaluate(self, loader: Iterable[Any], max_batches: int | None = None) -> float:
        """Mean loss over the first ``max_batches`` batches of ``loader`` (all when None), in eval mode.

        As the book's ``calc_loss_loader``: per-batch losses summed as Python floats, NaN for an
        empty loader; train mode is restored afterwards. Under torchrun the mean is over ranks.
        """
        n_total = len(loader)  # type: ignore[arg-type]
        n = n_total if max_batches is None else min(max_batches, n_total)
        was_training = self.model.training
        self.model.eval()
        total = 0.0
        with torch.no_grad():
            for i, (inputs, targets) in enumerate(loader):
                if i >= n:
                    break
                with self._autocast():
                    out = self.model(inputs.to(self.device, non_blocking=True))
                    total += self.loss_fn(out, targets.to(self.device, non_blocking=True)).item()
        self.model.train(was_training)
        mean = total / n if n > 0 else float("nan")
        if self._ddp is not None:
            mean = float(self._all_reduce_mean(torch.tensor(mean, device=self.device)))
        return mean

    def print(self, message: str) -> None:
        """Print a line on the main process without breaking a progress bar."""
        if self.state.is_main:
            from tqdm import tqdm

            tqdm.write(message)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Where the run stands, as tensors and plain values: counters, RNGs, scaler, data position.

        Taken inside ``after_step`` it describes the moment after that step, as if between steps.
        """
        st = self.state
        done = 1 if self._in_after_step else 0
        step, epoch, in_epoch, batches = st.step + done, st.epoch, st.step_in_epoch + done, st.batches_in_epoch
        epoch_rng = self._epoch_rng
        if batches >= len(self.train_loader):  # type: ignore[arg-type]
            epoch, in_epoch, batches, epoch_rng = epoch + 1, 0, 0, None
        return {
            "step": step,
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "batches_in_epoch": batches,
            "tokens_seen": st.tokens_seen,
            "epoch_rng": epoch_rng,
            "rng": self._rank_rngs(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "world_size": st.world_size,
        }

    def _rank_rngs(self) -> list[dict[str, Any]]:
        """Every rank's RNG states, by rank (each rank has its own GPU generator under torchrun)."""
        mine = capture_rng()
        if self._ddp is None:
            return [mine]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.state.world_size
        dist.all_gather_object(gathered, mine)
        return gathered

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the next fit continues exactly where it stood."""
        st = self.state
        if state["world_size"] != st.world_size:
            raise ValueError(
                f"checkpoint was written by {state['world_size']} process(es) but this run has "
                f"{st.world_size}; resume with the same number of processes"
            )
        st.step, st.epoch = state["step"], state["epoch"]
        st.step_in_epoch, st.batches_in_epoch = state["step_in_epoch"], state["batches_in_epoch"]
        st.tokens_seen = state["tokens_seen"]
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"][st.rank]
        if state["batches_in_epoch"] == 0:
            restore_rng(rng)
        else:
            self._resume = {"epoch_rng": state["epoch_rng"], "batches_in_epoch": state["batches_in_epoch"], "rng": rng}

    # ------------------------------------------------------------------ torchrun

    def _setup_distributed(self) -> None:
        """Under torchrun: join the process group, shard the data, wrap the model in DDP."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1 or self._ddp is not None:
            return
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data.distributed import DistributedSampler

        if not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self._owns_process_group = True
        self.state.rank, self.state.world_size = dist.get_rank(), dist.get_world_size()
        loader = self.train_loader
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "under torchrun the engine shards a torch DataLoader with a DistributedSampler; "
                f"got {type(loader).__name__}: pass a DataLoader (or shard the data yourself and run without torchrun)"
            )
        if not isinstance(loader.sampler, DistributedSampler):
            # one shuffle seed for all ranks, or their shards would overlap
            seed = torch.tensor([torch.initial_seed() % 2**31], device=self.device)
            dist.broadcast(seed, src=0)
            sampler = DistributedSampler(
                loader.dataset,
                shuffle=isinstance(loader.sampler, RandomSampler),
                seed=int(seed.item()),
                drop_last=loader.drop_last,
            )
            self.train_loader = DataLoader(  # same settings, this rank's shard
                loader.dataset,
                batch_size=loader.batch_size,
                sampler=sampler,
                drop_last=loader.drop_last,
                num_workers=loader.num_workers,
                pin_memory=loader.pin_memory,
                collate_fn=loader.collate_fn,
            )
        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(self.model, device_ids=device_ids)

    def _teardown_distributed(self) -> None:
        if self._ddp is None:
            return
        import torch.distributed as dist

        self._ddp = None
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    def _set_sampler_epoch(self, epoch: int) -> None:
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def _all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)
        return value / self.state.world_size

    def _agree_on_stop(self) -> None:
        """A stop (signal or should_stop) on any rank stops every rank after the same step."""
        import torch.distributed as dist

        flags = torch.tensor([self._stop_signal or 0, int(self.state.should_stop)], device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signum, stop = (int(v) for v in flags.tolist())
        self._stop_signal = signum or None
        self.state.should_stop = bool(stop)

    def barrier(self) -> None:
        """Wait for every rank (no-op outside torchrun)."""
        if self._ddp is not None:
            import torch.distributed as dist

            dist.barrier()

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank; every rank must call it (a barrier too)."""
        if self._ddp is None:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())
