"""Installed plugins: the ``enginekit`` entry-point group, loaded by name, never switched on silently.

The built-in plugins are entry points of the ``enginekit`` distribution itself, found exactly
like third-party ones: the core never imports a plugin module.
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "installed_plugins", "is_builtin", "load_plugin", "settings_of"]

ENTRY_POINT_GROUP = "enginekit"
BUILTIN_DISTRIBUTION = "enginekit"


def is_builtin(ep: EntryPoint) -> bool:
    """Whether the entry point is one of enginekit's own plugins."""
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.name == BUILTIN_DISTRIBUTION


def installed_plugins(third_party_only: bool = False) -> dict[str, EntryPoint]:
    """Entry points of the ``enginekit`` group by name (the first wins if two packages clash),
    built-in plugins included unless ``third_party_only``."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if third_party_only and is_builtin(ep):
            continue
        if ep.name in found and found[ep.name].value != ep.value:
            warnings.warn(
                f"two installed packages provide the enginekit plugin {ep.name!r}: "
                f"{_distribution_name(found[ep.name])} ({found[ep.name].value}) is used, "
                f"{_distribution_name(ep)} ({ep.value}) is ignored; uninstall one",
                stacklevel=2,
            )
            continue
        found.setdefault(ep.name, ep)
    return found


def _distribution_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "<unknown distribution>"


def load_entry_point(name: str) -> Any:
    """The object a plugin's entry point names (a class, a factory, an instance or a module), not built."""
    available = installed_plugins()
    ep = available.get(name)
    if ep is None:
        close = difflib.get_close_matches(name, list(available), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        names = ", ".join(sorted(available)) or "none installed"
        raise ValueError(
            f"no enginekit plugin named {name!r}{hint}; available: {names}. "
            f'A package provides one with [project.entry-points.{ENTRY_POINT_GROUP}] {name} = "module:Class"'
        )
    try:
        obj = ep.load()
    except Exception as exc:
        raise ImportError(
            f"enginekit plugin {name!r} (entry point {ep.value!r} of distribution {_distribution_name(ep)}) "
            f"failed to import: {type(exc).__name__}: {exc}; reinstall or fix that package"
        ) from exc
    return obj


def settings_of(factory: Any) -> dict[str, Any]:
    """The settings a plugin class or factory takes, with their defaults (``inspect.Parameter.empty``
    when required)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    return {
        name: p.default
        for name, p in params.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def describe_settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}" if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in settings.items()) or "none"


def load_plugin(name: str, settings: dict[str, Any] | None = None) -> tuple[Any, str]:
    """Build the plugin ``name`` with ``settings``; returns it and its registration name.

    A class or a factory function (a callable returning a plugin) is called with the settings; an
    instance is used as is (and takes no settings) and keeps its own ``plugin_name`` if it has one.
    """
    settings = dict(settings or {})
    obj = load_entry_point(name)
    if isinstance(obj, type) or inspect.isfunction(obj):
        accepted = settings_of(obj)
        kind = "class" if isinstance(obj, type) else "factory"
        where = f"enginekit plugin {name!r} ({kind} {obj.__module__}.{obj.__qualname__})"
        unknown = [k for k in settings if k not in accepted]
        if unknown and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _params(obj)):
            close = difflib.get_close_matches(unknown[0], list(accepted), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"{where} has no setting {unknown[0]!r}{hint}; its settings: {describe_settings(accepted)}"
            )
        try:
            plugin = obj(**settings)
        except TypeError as exc:
            raise ValueError(
                f"{where} cannot be built with {settings or 'no settings'}: {exc}; "
                f"its settings: {describe_settings(accepted)}"
            ) from exc
        return plugin, name
    if settings:
        raise ValueError(
            f"enginekit plugin {name!r} is a ready-made {type(obj).__name__} instance and takes no settings; "
            f"got {settings}"
        )
    own = getattr(obj, "plugin_name", None)
    return obj, own if isinstance(own, str) and own else name


def _params(obj: Any) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return []
