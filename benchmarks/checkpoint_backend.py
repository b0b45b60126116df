"""The main job's checkpoint, written and resumed by the DCP backend and by the hand-made writer it
replaced, side by side in one process: is the hand-made path >= 1.5x faster anywhere?

    python benchmarks/checkpoint_backend.py                     # 4 pairs, legacy writer of d1a5f69
    python benchmarks/checkpoint_backend.py --pairs 6 --dir /some/disk
    python benchmarks/checkpoint_backend.py --legacy-file old_checkpoint.py   # no git history here

The state is the main job's: the 124M GPT (``GPT_CONFIG_124M``, context 256) in a real
:class:`~enginekit.Engine` with the book's schedule plugins, its AdamW stepped (twice) so its moments
exist (1.95 GB of tensors). Both plugins save that same engine synchronously
(``save(engine, background=False)``: state dicts, serialisation, sha256 of every byte, write, fsync,
rename, the hash or manifest file), as training waits for a fit's last save:

- ``legacy``: ``plugins/checkpoint.py`` as of ``--legacy-rev`` (default d1a5f69, the commit before
  DCP), extracted with ``git show`` into a temporary module: one ``.pt`` through its O_DIRECT
  writer that hashes beside the write, and its ``.sha256`` file;
- ``dcp``: today's :class:`enginekit.plugins.Checkpoint` (``torch.distributed.checkpoint``, the
  file hashed as it is written, ``state.pt``, ``manifest.json``).

Each pair runs both, one first then the other, the order alternating from pair to pair; a pair's
ratio is dcp over legacy, so drift between pairs cancels. Wall is ``perf_counter``; CPU is the
process's user + system time (every thread: the legacy hashing thread, DCP's writer). Resume: each
plugin's own resume path (legacy: ``load()``'s verify + ``torch.load``, the checks, then
``load_state_dict``, the file hashed twice on the way, once more for the other ranks; dcp:
manifest, ``state.pt`` and ``.metadata`` checks, then ``dcp.load`` verifying each file as it maps
it) into the same engine, right after its save, from a cold page cache (every file of the
checkpoint dropped from it first with ``posix_fadvise``: the legacy writer bypasses the cache,
DCP's goes through it, and a restart after a crash may have neither).
Checkpoints are deleted after each round, outside the timings.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from _common import machine, schedule, summary

from enginekit import Engine
from enginekit.data import verdict_loaders
from enginekit.gpt import GPT_CONFIG_124M, GPTModel
from enginekit.plugins import Checkpoint

ROOT = Path(__file__).resolve().parents[1]
LEGACY_PATH = "plugins/checkpoint.py"
BACKENDS = ("legacy", "dcp")


def legacy_source(rev: str) -> str:
    """The hand-made writer's module as of ``rev``; exits with a plain reason when it is not to be had."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{rev}:{LEGACY_PATH}"], capture_output=True, text=True, timeout=60
        )
    except FileNotFoundError:
        raise SystemExit(
            f"error: git is not installed, so the legacy writer ({LEGACY_PATH} at {rev}) cannot be extracted; "
            "pass --legacy-file with a copy of it"
        ) from None
    if proc.returncode != 0:
        raise SystemExit(
            f"error: `git show {rev}:{LEGACY_PATH}` failed in {ROOT} ({proc.stderr.strip() or 'no message'}): "
            "no git history here, or no such revision; pass --legacy-rev REV of this repository, or --legacy-file"
        )
    return proc.stdout


def load_legacy(source: str, where: Path) -> ModuleType:
    path = where / "enginekit_legacy_checkpoint.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("enginekit_legacy_checkpoint", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and the like look their module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise SystemExit(f"error: the legacy {LEGACY_PATH} does not import with this enginekit/torch: {exc!r}") from exc
    if not hasattr(module, "Checkpoint"):
        raise SystemExit(f"error: the legacy {LEGACY_PATH} has no Checkpoint class")
    return module


def main_job_engine() -> Engine:
    """The 124M model at the main job's shape, trained two steps (AdamW's moments exist from the first;
    the schedule's clipping starts at the second)."""
    torch.manual_seed(123)
    model = GPTModel(GPT_CONFIG_124M)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    train, val = verdict_loaders(batch_size=2, context_length=GPT_CONFIG_124M["context_length"])
    plugins, _ = schedule(2)
    engine = Engine(model, optimizer, train, val, plugins=plugins, device="cpu")
    engine.fit(max_steps=2)
    return engine


def state_bytes(engine: Engine) -> int:
    tensors = list(engine.model.state_dict().values())
    tensors += [t for s in engine.optimizer.state_dict()["state"].values() for t in s.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def timed(fn: Callable[[], Any]) -> tuple[float, float, float, Any]:
    """Wall, process CPU (user + system, every thread) and system seconds of ``fn()``, and its result."""
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    system = after.ru_stime - before.ru_stime
    return wall, (after.ru_utime - before.ru_utime) + system, system, result


def drop_from_page_cache(folder: Path) -> None:
    """Evict every file under ``folder`` from the page cache (they are synced: their pages are clean)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def one_round(backend: str, legacy: ModuleType, engine: Engine, folder: Path) -> dict[str, float]:
    folder.mkdir(parents=True)
    plugin_class = legacy.Checkpoint if backend == "legacy" else Checkpoint
    writer = plugin_class(folder, keep_last=1, async_write=False)
    save_wall, save_cpu, save_sys, path = timed(lambda: writer.save(engine, background=False))
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    drop_from_page_cache(folder)
    reader = plugin_class(folder, keep_last=1, resume=True, async_write=False)
    with contextlib.redirect_stdout(io.StringIO()):  # the resume's own lines ("resumed from ...")
        load_wall, load_cpu, load_sys, _ = timed(lambda: reader._resume(engine))
    if reader.resumed_from != path:
        raise SystemExit(f"error: {backend} resumed from {reader.resumed_from}, not the checkpoint it wrote ({path})")
    shutil.rmtree(folder)
    return {
        "save wall": save_wall, "save CPU": save_cpu, "save system": save_sys,
        "load wall": load_wall, "load CPU": load_cpu, "load system": load_sys, "MB": size / 1e6,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4, help="back-to-back pairs, the order alternating (default 4)")
    p.add_argument("--legacy-rev", default="d1a5f69", help=f"the commit whose {LEGACY_PATH} is the legacy writer")
    p.add_argument("--legacy-file", type=Path, default=None, help="that module's source, instead of git show")
    p.add_argument("--dir", type=Path, default=ROOT / "benchmarks", help="where the checkpoints go (a local disk)")
    p.add_argument(
        "--plain-dcp",
        action="store_true",
        help="dcp without enginekit's stream layer: through the page cache, sha256 inline, CRC32 on (DCP as it ships)",
    )
    args = p.parse_args()
    if args.plain_dcp:
        from enginekit.checkpointing import dcp

        dcp._set_direct = lambda fd, on: False  # type: ignore[assignment]
        dcp._HashingStream.HASH_BESIDE = 1 << 62
        dcp.without_crc32 = contextlib.nullcontext  # type: ignore[assignment]
    if args.pairs < 1:
        p.error("--pairs must be >= 1")
    source = args.legacy_file.read_text() if args.legacy_file else legacy_source(args.legacy_rev)
    origin = str(args.legacy_file) if args.legacy_file else f"{LEGACY_PATH} at {args.legacy_rev}"
    with (
        tempfile.TemporaryDirectory(prefix="enginekit-legacy-") as module_dir,
        tempfile.TemporaryDirectory(dir=args.dir, prefix="checkpoint-backend-") as tmp,
    ):
        legacy = load_legacy(source, Path(module_dir))
        engine = main_job_engine()
        print(f"machine: {machine()}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start")
        size = state_bytes(engine) / 1e9
        print(f"state: 124M GPT + AdamW, {size:.2f} GB of tensors; legacy: {origin}; checkpoints in {args.dir}")
        if args.plain_dcp:
            print("dcp: plain (page cache, sha256 inline, CRC32 on)")
        rows: dict[str, list[dict[str, float]]] = {b: [] for b in BACKENDS}
        n = 0
        for pair in range(args.pairs):
            order = BACKENDS if pair % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                n += 1
                row = one_round(backend, legacy, engine, Path(tmp) / f"round-{n}")
                rows[backend].append(row)
                print(
                    f"pair {pair + 1} {backend:6s}: save wall {row['save wall']:5.2f} s CPU {row['save CPU']:5.2f} s "
                    f"(system {row['save system']:4.2f}) | resume wall {row['load wall']:5.2f} s "
                    f"CPU {row['load CPU']:5.2f} s (system {row['load system']:4.2f}) | {row['MB']:,.0f} MB on disk",
                    flush=True,
                )
    print(f"\nmedians of {args.pairs} pairs [min..max]; ratio = dcp / legacy within each pair (< 1: dcp faster)")
    for key in ("save wall", "save CPU", "save system", "load wall", "load CPU", "load system"):
        parts = []
        for backend in BACKENDS:
            med, lo, hi = summary([r[key] for r in rows[backend]])
            parts.append(f"{backend} {med:5.2f} s [{lo:.2f}..{hi:.2f}]")
        ratios = [d[key] / max(lg[key], 1e-9) for lg, d in zip(rows["legacy"], rows["dcp"])]
        med, lo, hi = summary(ratios)
        print(f"{key:11s}: {'  '.join(parts)}  ratio {med:.2f} [{lo:.2f}..{hi:.2f}]")
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
