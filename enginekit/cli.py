"""The ``enginekit`` command: what plugins are available and how hooks are dispatched.

enginekit plugins                     built-in and installed plugins, origin, hooks
enginekit hooks                       the hook protocol, in firing order
enginekit hooks lr_warmup grad_clip   ...and the order those plugins are called per hook
"""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Any

from . import hookspec
from .discovery import describe_settings, installed_plugins, is_builtin, load_entry_point, settings_of
from .registry import HOOK_NAMES, new_manager

__all__ = ["main"]


def builtin_plugins() -> dict[str, type]:
    """Built-in plugin classes by name, loaded through their entry points like any other plugin."""
    return {name: ep.load() for name, ep in sorted(installed_plugins().items()) if is_builtin(ep)}


_manager = new_manager


def _hooks_of(plugin: Any) -> list[str]:
    pm = _manager()
    pm.register(plugin, name="x")
    return [h for h in HOOK_NAMES if any(i.plugin_name == "x" for i in getattr(pm.hook, h).get_hookimpls())]


def _resolve(name: str) -> Any:
    """A plugin class or object by name, without building it (no settings needed to inspect it)."""
    builtins = builtin_plugins()
    if name in builtins:
        return builtins[name]
    eps = installed_plugins(third_party_only=True)
    if name in eps:
        try:
            return load_entry_point(name)
        except ImportError as exc:
            raise SystemExit(f"enginekit: {exc}") from exc
    known = ", ".join(sorted({*builtins, *eps}))
    raise SystemExit(f"enginekit: unknown plugin {name!r}; known: {known}")


def _describe(obj: Any) -> tuple[str, str]:
    """A plugin entry point's hooks and settings (with defaults), without building it."""
    if inspect.isfunction(obj):
        return "known once built (a factory)", describe_settings(settings_of(obj))
    hooks = ", ".join(_hooks_of(obj)) or "none"
    settings = describe_settings(settings_of(obj)) if isinstance(obj, type) else "none (a ready-made instance)"
    return hooks, settings


def cmd_plugins(_: argparse.Namespace) -> int:
    rows = [
        (name, f"built-in ({cls.__module__}.{cls.__qualname__})", *_describe(cls))
        for name, cls in builtin_plugins().items()
    ]
    for name, ep in sorted(installed_plugins(third_party_only=True).items()):
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name} {dist.version}" if dist is not None else "?"
        try:
            hooks, settings = _describe(ep.load())
        except Exception as exc:
            hooks, settings = f"<fails to import: {type(exc).__name__}: {exc}>", "?"
        rows.append((name, f"installed: {origin} ({ep.value})", hooks, settings))
    width = max(len(r[0]) for r in rows)
    for name, origin, hooks, settings in rows:
        print(f"{name:<{width}}  {origin}")
        print(f"{'':<{width}}  hooks: {hooks}")
        print(f"{'':<{width}}  settings: {settings}")
    print("\nPlugins run only when named: Engine(plugins=['<name>', ('<name>', {'setting': value}), ...]),")
    print("or on the example's command line: --plugin '<name>:setting=value,other=value'.")
    return 0


def cmd_hooks(args: argparse.Namespace) -> int:
    pm = _manager()
    for name in args.plugins:
        if pm.get_plugin(name) is not None:  # pluggy's own refusal is a traceback
            raise SystemExit(
                f"enginekit: plugin {name!r} is named twice; name each plugin once (an engine registers a second "
                f"one only under a name of its own: ('{name}_2', plugin))"
            )
        pm.register(_resolve(name), name=name)
    print("Hooks, in the order one fit emits them (step hooks once per optimizer step):")
    for hook in HOOK_NAMES:
        doc = inspect.getdoc(getattr(hookspec, hook)) or ""
        line = f"  {hook:<15} {doc.splitlines()[0] if doc else ''}"
        if args.plugins:
            # pluggy enters wrappers first (their code after ``yield`` runs after everyone else),
            # then tryfirst implementations, the rest last-registered first, trylast ones last
            order = [
                impl.plugin_name
                + ("(wrapper)" if impl.wrapper or impl.hookwrapper else "")
                + ("(tryfirst)" if impl.tryfirst else "(trylast)" if impl.trylast else "")
                for impl in reversed(getattr(pm.hook, hook).get_hookimpls())
            ]
            line += f"\n  {'':<15} called: {' -> '.join(order) if order else '-'}"
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enginekit", description="Inspect enginekit's plugins and hooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "plugins", help="list built-in and installed plugins, where each comes from, its hooks"
    ).set_defaults(func=cmd_plugins)
    hooks = sub.add_parser("hooks", help="the hook protocol; with plugin names, the call order per hook")
    hooks.add_argument("plugins", nargs="*", help="plugin names in registration order (built-in or installed)")
    hooks.set_defaults(func=cmd_hooks)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
