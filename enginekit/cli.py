"""The ``enginekit`` command: what plugins are available and how hooks are dispatched.

enginekit plugins                     built-in and installed plugins, origin, hooks
enginekit hooks                       the hook protocol, in firing order
enginekit hooks lr_warmup grad_clip   ...and the order those plugins are called per hook
enginekit prepare SOURCES... --out DIR  tokenize your own text into a corpus to train on
enginekit consolidate CKPT OUT        a checkpoint (any strategy, any world size) to one book-style model.pt
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


def cmd_prepare(args: argparse.Namespace) -> int:
    from .corpus import CorpusError
    from .files import FolderBusyError
    from .prepare import prepare_corpus

    try:
        manifest = prepare_corpus(
            args.sources,
            args.out,
            field=args.field,
            val_fraction=args.val_fraction,
            seed=args.seed,
            errors=args.errors,
            shard_tokens=args.shard_tokens,
            workers=args.workers,
            progress=not args.quiet,
        )
    except (CorpusError, FolderBusyError) as exc:
        print(f"enginekit prepare: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"enginekit prepare: error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    splits = manifest["splits"]
    print(
        f"{args.out}: train {splits['train']['tokens']:,} tokens ({splits['train']['documents']:,} documents, "
        f"{len(splits['train']['shards'])} shard(s)), val {splits['val']['tokens']:,} tokens "
        f"({splits['val']['documents']:,} documents); train on it: "
        f"python examples/pretrain_verdict.py --data {args.out}"
    )
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from .checkpointing import CheckpointError, consolidate

    try:
        weights = consolidate(args.checkpoint, args.out)
    except CheckpointError as exc:
        print(f"enginekit consolidate: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"enginekit consolidate: error: {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    count = sum(t.numel() for t in weights.values())
    print(
        f"{args.out}: {len(weights)} tensors, {count:,} values; load it with "
        "model.load_state_dict(torch.load(PATH, weights_only=True))"
    )
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _add_prepare(sub: Any) -> None:
    from .prepare import DEFAULT_SHARD_TOKENS

    prep = sub.add_parser(
        "prepare",
        help="tokenize text files, folders, globs, .jsonl and .gz into token shards to train on",
        description="Tokenize SOURCES with the bundled GPT-2 tokenizer into DIR (token shards + manifest.json), "
        "ready for examples/pretrain_verdict.py --data DIR. A text file is one document, a .jsonl line is one "
        "document; each ends with <|endoftext|>. Rerunning on an unfinished DIR starts over.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prep.add_argument(
        "sources", nargs="+", help="files, folders (recursive: .txt .text .md .rst .jsonl, also .gz), globs"
    )
    prep.add_argument("--out", required=True, type=str, help="folder for the shards (new, empty, or unfinished)")
    prep.add_argument("--field", default="text", help="the text field of .jsonl records")
    prep.add_argument(
        "--val-fraction", type=_fraction, default=0.1, help="chance a document goes to validation (0: none)"
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of the validation draws")
    prep.add_argument(
        "--errors", choices=["strict", "replace"], default="strict", help="bytes that are not UTF-8: stop, or U+FFFD"
    )
    prep.add_argument("--shard-tokens", type=_positive_int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    prep.add_argument(
        "--workers", type=_positive_int, default=None, help="tokenizer processes (default: every CPU available)"
    )
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=cmd_prepare)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="enginekit",
        description=(
            "Inspect enginekit's plugins and hooks; prepare a corpus of your own text; consolidate a checkpoint."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "plugins", help="list built-in and installed plugins, where each comes from, its hooks"
    ).set_defaults(func=cmd_plugins)
    hooks = sub.add_parser("hooks", help="the hook protocol; with plugin names, the call order per hook")
    hooks.add_argument("plugins", nargs="*", help="plugin names in registration order (built-in or installed)")
    hooks.set_defaults(func=cmd_hooks)
    _add_prepare(sub)
    cons = sub.add_parser(
        "consolidate",
        help="a checkpoint to one model.pt (the book's torch.save(model.state_dict()))",
        description="Gather a checkpoint's model weights (from every rank's shards) into one state_dict file.",
    )
    cons.add_argument("checkpoint", help="a ckpt-<step> folder, or a run's checkpoint folder (its newest good one)")
    cons.add_argument("out", help="the file to write, e.g. model.pt")
    cons.set_defaults(func=cmd_consolidate)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
