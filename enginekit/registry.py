"""The plugin registry: pluggy's manager, validation at registration, and errors that name the plugin."""

from __future__ import annotations

import difflib
import inspect
import re
import types
import warnings
from collections.abc import Sequence
from typing import Any

import pluggy

from . import hookspec

__all__ = ["HOOK_NAMES", "PluginError", "PluginValueError", "Registry", "default_plugin_name", "plugin_settings"]

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


#: how Registry.emit calls a hook (see Registry._direct_calls)
_NOTHING, _ENGINE_ONLY, _ENGINE_AND_VALUE, _BY_NAME, _PLUGGY = range(5)


class _PluginManager(pluggy.PluginManager):
    """Treats a public method named exactly like a hook as an implementation even without
    ``@hookimpl`` (as pytest does), so forgetting the decorator is never a silent no-op.

    ``generation`` changes whenever what a hook call would run may have changed (a plugin
    registered or unregistered, specs added, call monitoring attached or detached), so the
    registry knows when its direct-call plan is stale; ``monitors`` counts attached monitors.
    """

    generation = 0
    monitors = 0

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        self.generation += 1
        return super().register(plugin, name)

    def unregister(self, plugin: Any = None, name: str | None = None) -> Any:
        self.generation += 1
        return super().unregister(plugin, name)

    def add_hookspecs(self, module_or_class: Any) -> None:
        self.generation += 1
        super().add_hookspecs(module_or_class)

    def add_hookcall_monitoring(self, before: Any, after: Any) -> Any:
        undo = super().add_hookcall_monitoring(before, after)
        self.monitors += 1
        self.generation += 1

        def undo_and_count() -> None:
            undo()
            self.monitors -= 1
            self.generation += 1

        return undo_and_count

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
        self._plan: dict[str, tuple[int, tuple[Any, ...]]] = {}
        self._plan_generation = -1

    def emit(self, hook_name: str, /, **kwargs: Any) -> None:
        """Call ``hook_name``'s implementations, in pluggy's order, with the engine and ``kwargs``;
        an implementation's exception becomes a :class:`PluginError` naming it and the step.

        Pluggy's own call costs microseconds per hook even with no implementation, and the engine
        emits four hooks every step. So when a hook has only plain implementations (no wrapper)
        and nobody monitors calls, the registry calls them itself, from a plan rebuilt whenever
        registration changes: the same functions, order, arguments and exceptions as pluggy.
        Otherwise (a wrapper, a ``HookRecorder``, ``pm.trace``) pluggy makes the call.
        """
        engine = self.engine
        try:
            if self._plan_generation != self.pm.generation:
                self._replan()
            mode, calls = self._plan[hook_name]
            if mode == _NOTHING:
                return
            if mode == _ENGINE_ONLY:
                for function in calls:
                    function(engine)
            elif mode == _ENGINE_AND_VALUE:  # every implementation takes (engine, the hook's one argument)
                (value,) = kwargs.values()
                for function in calls:
                    function(engine, value)
            elif mode == _BY_NAME:  # a mix: each gets the arguments it names, as pluggy passes them
                values = {"engine": engine, **kwargs}
                for function, argnames in calls:
                    function(*[values[name] for name in argnames])
            else:
                getattr(self.hook, hook_name)(engine=engine, **kwargs)
        except PluginError:
            raise
        except Exception as exc:
            where = f"at step {engine.state.step} (epoch {engine.state.epoch + 1})"  # as the book prints: Ep 1
            raise self.plugin_error(hook_name, exc, where) from exc

    def _replan(self) -> None:
        self._plan = {name: self._direct_calls(name) for name in HOOK_NAMES}
        self._plan_generation = self.pm.generation

    def _direct_calls(self, hook_name: str) -> tuple[int, tuple[Any, ...]]:
        """How ``emit`` calls ``hook_name`` now: a mode, and the functions in pluggy's order."""
        caller = getattr(self.hook, hook_name)
        impls = caller.get_hookimpls()
        if self.pm.monitors or any(impl.wrapper or impl.hookwrapper or impl.kwargnames for impl in impls):
            return _PLUGGY, ()
        if not impls:
            return _NOTHING, ()
        impls = impls[::-1]  # pluggy calls the last registered first (tryfirst/trylast already sorted in)
        argnames = {tuple(impl.argnames) for impl in impls}
        spec_args = tuple(caller.spec.argnames)
        if argnames == {("engine",)}:
            return _ENGINE_ONLY, tuple(impl.function for impl in impls)
        if argnames == {spec_args} and len(spec_args) == 2:  # engine and the hook's one argument, in order
            return _ENGINE_AND_VALUE, tuple(impl.function for impl in impls)
        return _BY_NAME, tuple((impl.function, tuple(impl.argnames)) for impl in impls)

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

    def plugin_error(self, hook_name: str, exc: Exception, where: str) -> PluginError:
        """Name the plugin whose hook raised, found by matching the traceback's frames."""
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
        message = f"plugin {plugin_name!r} failed in hook {hook_name!r} {where}: {type(exc).__name__}: {exc}"
        try:
            error = _plugin_error_class(type(exc))(message, plugin_name, hook_name)
        except Exception:  # an exception type whose constructor needs other arguments
            error = PluginError(message, plugin_name, hook_name)
        for key, value in vars(exc).items():  # keep what the original carries (CheckpointError.details, ...)
            if key not in ("plugin_name", "hook_name"):
                setattr(error, key, value)
        return error
