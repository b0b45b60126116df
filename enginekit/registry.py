"""The plugin registry: pluggy's manager, validation at registration, and notes that name a failing plugin."""

from __future__ import annotations

import difflib
import inspect
import re
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from . import hookspec

__all__ = [
    "HOOK_NAMES",
    "PluginFailure",
    "Registry",
    "blame",
    "default_plugin_name",
    "describe_error",
    "plugin_failure",
    "plugin_settings",
]

#: Every hook, in the order one ``fit`` first emits them.
HOOK_NAMES = (
    "before_fit",
    "before_epoch",
    "before_step",
    "after_backward",
    "before_optimizer_step",
    "after_step",
    "after_evaluate",
    "on_save_point",
    "after_epoch",
    "after_fit",
    "on_exception",
)


@dataclass(frozen=True)
class PluginFailure:
    """Where a plugin's exception came from: the plugin, the hook and the step.

    ``fit`` re-raises a plugin's exception itself, so ``except ValueError`` (or
    ``except CheckpointError``) around it catches what the plugin raised; the exception carries
    this as a note (shown in its traceback) and :func:`plugin_failure` reads it back.
    """

    plugin_name: str
    hook_name: str
    step: int
    epoch: int
    #: what the plugin was doing when it is not its own hook (its ``state_dict()``, called by Checkpoint)
    detail: str = ""

    def __str__(self) -> str:
        where = f"at step {self.step} (epoch {self.epoch + 1})"  # epochs 1-based in messages, as the book prints
        doing = self.detail or f"in hook {self.hook_name!r}"
        return f"plugin {self.plugin_name!r} failed {doing} {where}"


_FAILURE_ATTRIBUTE = "__enginekit_failure__"


def plugin_failure(error: BaseException) -> PluginFailure | None:
    """The plugin, hook and step a hook's exception came from; None for an error of the engine's own."""
    failure = getattr(error, _FAILURE_ATTRIBUTE, None)
    return failure if isinstance(failure, PluginFailure) else None


def blame(error: BaseException, plugin_name: str, hook_name: str, state: Any, detail: str = "") -> BaseException:
    """Note on ``error`` that plugin ``plugin_name`` caused it (a persister that called another
    plugin's ``state_dict()`` names that plugin, not itself); the engine then adds no note of its own."""
    failure = PluginFailure(plugin_name, hook_name, state.step, state.epoch, detail)
    error.add_note(str(failure))
    try:
        setattr(error, _FAILURE_ATTRIBUTE, failure)
    except AttributeError:  # an exception type with __slots__ and no __dict__: the note must do
        pass
    return error


def describe_error(error: BaseException) -> str:
    """One line for a user: ``plugin 'x' failed in hook 'after_step' at step 12 (epoch 2): KeyError: 'y'``
    for a plugin's exception, the exception's own message otherwise."""
    failure = plugin_failure(error)
    return f"{failure}: {type(error).__name__}: {error}" if failure is not None else str(error)


def plugin_settings(plugin: object) -> dict[str, Any]:
    """A plugin's settings as they are now: each constructor parameter read back from the
    attribute of the same name (a parameter stored under another name is not shown)."""
    try:
        params = inspect.signature(type(plugin).__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {p: getattr(plugin, p) for p in params if p != "self" and hasattr(plugin, p)}


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


def new_manager() -> _PluginManager:
    """A plugin manager that knows every enginekit hook."""
    pm = _PluginManager(hookspec.PROJECT)
    pm.add_hookspecs(hookspec)
    return pm


class Registry:
    """An engine's plugins: registration with validation, lookup by name, and emitting hooks to them."""

    def __init__(self, engine: Any) -> None:
        #: what every hook receives as ``engine``
        self.engine = engine
        self.pm = new_manager()
        self.hook = self.pm.hook

    def emit(self, hook_name: str, /, **kwargs: Any) -> None:
        """Call ``hook_name`` through pluggy with the engine and ``kwargs``. An implementation's
        exception propagates unchanged in type, with a note naming the plugin, the hook and the step."""
        try:
            getattr(self.hook, hook_name)(engine=self.engine, **kwargs)
        except Exception as exc:
            if plugin_failure(exc) is None:  # a nested emit (after_evaluate inside after_step) named it already
                self._attribute(hook_name, exc)
            raise

    def register(self, plugin: Any, name: str | None = None, settings: dict[str, Any] | None = None) -> Any:
        """Register a plugin object, or a plugin by its entry-point name built with ``settings``,
        and validate it now."""
        if isinstance(plugin, str):
            from .discovery import load_plugin

            plugin, loaded_name = load_plugin(plugin, settings)
            name = name or loaded_name
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
        hooks = [attr for attr in dir(plugin) if self.pm.parse_hookimpl_opts(plugin, attr) is not None]
        if not hooks:
            raise ValueError(
                f"plugin {name!r} ({plugin!r}) implements no hook, so it would never run; a plugin is an "
                f"object with @hookimpl methods named after hooks: {', '.join(HOOK_NAMES)}"
            )
        self._warn_near_misses(name, plugin)
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            signatures = "; ".join(
                f"{h}({', '.join(inspect.signature(getattr(hookspec, h)).parameters)})" for h in HOOK_NAMES
            )
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

    def _warn_near_misses(self, name: str, plugin: Any) -> None:
        """An undecorated method one typo away from a hook is never called: say so."""
        for attr in dir(plugin):
            if attr.startswith("_") or attr in HOOK_NAMES or not callable(getattr(plugin, attr, None)):
                continue
            close = difflib.get_close_matches(attr, HOOK_NAMES, n=1, cutoff=0.85)
            if close and self.pm.parse_hookimpl_opts(plugin, attr) is None:
                warnings.warn(
                    f"plugin {name!r}: method {attr!r} is not a hook, so it is never called "
                    f"(did you mean {close[0]!r}?)",
                    stacklevel=4,
                )

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

    def register_all(self, plugins: Sequence[Any], autoload: bool) -> None:
        """``Engine(plugins=...)``: objects, ``(name, plugin)`` pairs, plugin names (built-in or
        installed), or ``(name, {settings})`` pairs; with ``autoload`` also every installed
        third-party plugin not already registered by name."""
        for plugin in plugins:
            if isinstance(plugin, tuple) and len(plugin) == 2 and isinstance(plugin[0], str):
                name, value = plugin
                if isinstance(value, dict):
                    self.register(name, settings=value)
                else:
                    self.register(value, name=name)
            elif isinstance(plugin, tuple):
                raise ValueError(
                    f"plugins entry {plugin!r}: a pair is (name, plugin) or (name, {{settings}}), name a string"
                )
            else:
                self.register(plugin)
        if autoload:
            from .discovery import installed_plugins

            for ep_name in installed_plugins(third_party_only=True):
                if self.pm.get_plugin(ep_name) is None:
                    self.register(ep_name)

    @property
    def plugins(self) -> dict[str, Any]:
        """Registered plugins by registration name, in registration order."""
        return dict(self.pm.list_name_plugin())

    def _attribute(self, hook_name: str, exc: Exception) -> None:
        """Note on ``exc`` which plugin raised it, found by matching the traceback's frames."""
        impls = {
            getattr(impl.function, "__code__", None): impl.plugin_name
            for impl in getattr(self.hook, hook_name).get_hookimpls()
        }
        plugin_name = "<unknown>"
        tb = exc.__traceback__
        while tb is not None:  # the innermost match: an error passing through a wrapper's yield is not the wrapper's
            if tb.tb_frame.f_code in impls:
                plugin_name = impls[tb.tb_frame.f_code]
            tb = tb.tb_next
        blame(exc, plugin_name, hook_name, self.engine.state)
