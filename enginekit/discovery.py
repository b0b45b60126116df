"""Installed plugins: the ``enginekit`` entry-point group, loaded by name, never switched on silently.

The built-in plugins are entry points of the ``enginekit`` distribution itself, found exactly
like third-party ones: the core never imports a plugin module.
"""

from __future__ import annotations

import warnings
from importlib.metadata import EntryPoint, entry_points
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "installed_plugins", "is_builtin", "load_plugin"]

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
    """The object an installed plugin's entry point names (a class or a module), not built."""
    available = installed_plugins()
    ep = available.get(name)
    if ep is None:
        names = ", ".join(sorted(available)) or "none installed"
        raise ValueError(
            f"no installed enginekit plugin named {name!r}; available: {names}. "
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


def load_plugin(name: str) -> Any:
    """Load the installed plugin ``name``: a class is instantiated with no arguments, a module used as is."""
    obj = load_entry_point(name)
    if isinstance(obj, type):
        try:
            return obj()
        except TypeError as exc:
            raise TypeError(
                f"enginekit plugin {name!r} ({obj.__module__}.{obj.__qualname__}) cannot be built "
                f"without arguments: {exc}; "
                "build it yourself and pass the instance in plugins=[...]"
            ) from exc
    return obj
