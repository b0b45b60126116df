"""Pretrain the book's GPT on "The Verdict" with appendix D's techniques, as enginekit plugins.

The defaults reproduce the book's final appendix-D run: the 124M model at context 256,
AdamW(lr=1e-3, weight_decay=0.1), batch 2, 15 epochs (135 steps), 20% linear warmup from 1e-5,
cosine decay to 1e-5, gradient clipping at 1.0 after warmup, evaluation every 5 steps on one
batch, a greedy sample after each epoch, a checkpoint after each epoch.

    python examples/pretrain_verdict.py                      # the book's run (2-core CPU: ~11 min)
    python examples/pretrain_verdict.py --model tiny --epochs 2 --out runs/tiny
    python examples/pretrain_verdict.py --resume             # continue after an interruption
    torchrun --standalone --nproc_per_node=2 examples/pretrain_verdict.py --model tiny

Exit status: 0 done (also a --resume of a run that is already finished: one line says so, and
no step runs); 1 a training error (bad setting found at fit time, plugin failure,
corrupt checkpoints, another run using OUT); 2 bad command-line arguments (also an OUT that
cannot be written); 3 non-finite loss; 4 a checkpoint could not be written (disk full,
non-finite weights: the line says which checkpoint is the newest); 130 after SIGINT and 143 after
SIGTERM: after one signal a checkpoint of the last finished step was written first; after a second
one the run stopped at once, a save in progress abandoned (its lines say so and name the newest
checkpoint on disk); a signal outside training also ends with 130/143.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from enginekit import Engine, NonFiniteLossError, PluginError, TrainingAborted, TrainingInterrupted
from enginekit.data import verdict_loaders
from enginekit.files import FolderBusyError, atomic_write, lock_folder, unlock_folder
from enginekit.gpt import GPT_CONFIG_124M, GPT_CONFIG_TINY, GPTModel
from enginekit.plugins import (
    Checkpoint,
    CheckpointError,
    CheckpointWriteError,
    CosineDecay,
    GradClip,
    LossTracker,
    LRWarmup,
    ProgressBar,
    SampleText,
    plot_lrs,
)
from enginekit.registry import plugin_settings
from enginekit.testing import drive

CONFIGS = {"124M": GPT_CONFIG_124M, "tiny": GPT_CONFIG_TINY}


def number(minimum: float | None = None, above: float | None = None, below: float | None = None):
    """An argparse type: a finite float in range; NaN, inf and out-of-range values exit 2 naming the flag."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = math.isfinite(value)
        ok = ok and (minimum is None or value >= minimum) and (above is None or value > above)
        if not (ok and (below is None or value < below)):
            bounds = [f">= {minimum}" if minimum is not None else "", f"> {above}" if above is not None else ""]
            bounds.append(f"< {below}" if below is not None else "")
            raise argparse.ArgumentTypeError(
                f"must be a finite number {' and '.join(b for b in bounds if b)}, got {text}"
            )
        return value

    return parse


def count(minimum: int = 1, maximum: int | None = None):
    """An argparse type: an int in range (exit 2 naming the flag otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            limit = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            raise argparse.ArgumentTypeError(f"must be {limit}, got {text}")
        return value

    return parse


def plugin_spec(text: str) -> tuple[str, dict[str, object]]:
    """``name`` or ``name:setting=value,...``; values are Python literals, a bare word is a string."""
    name, _, rest = text.partition(":")
    if not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:SETTING=VALUE,..., got {text!r}")
    settings: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"setting {item!r} of plugin {name!r} is not SETTING=VALUE")
        try:
            settings[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            settings[key.strip()] = raw.strip()  # monitor=val_loss reads as the string it says
    return name.strip(), settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Pretrain GPT on The Verdict with enginekit (appendix D of the book).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--model", choices=sorted(CONFIGS), default="124M", help="124M: the book's model; tiny: trains in seconds"
    )
    g.add_argument("--epochs", type=count(), default=15, help="passes over the training text")
    g.add_argument("--max-steps", type=count(), default=None, help="stop after this many optimizer steps")
    g.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps")
    g.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="bf16: autocast on CPU/CUDA; fp16: autocast + GradScaler, for CUDA (on CPU only to test that path)",
    )
    g.add_argument(
        "--seed",
        type=count(0, 2**64 - 1),
        default=123,
        help="torch.manual_seed before building the model (the book uses 123)",
    )
    g.add_argument(
        "--batch-size", type=count(), default=2, help="sequences per micro-batch and process (the loader's batch)"
    )
    g.add_argument("--grad-accum", type=count(), default=1, help="micro-batches per optimizer step")
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the model (helps on GPU; did not on a 2-core CPU)"
    )
    g.add_argument(
        "--out",
        dest="out_text",
        metavar="OUT",
        default="runs/verdict",
        help="metrics.jsonl, losses.png, lr.png, model.pt, checkpoints/",
    )
    s = p.add_argument_group("schedule and clipping (appendix D)")
    s.add_argument("--peak-lr", type=number(above=0), default=1e-3, help="AdamW lr, reached after warmup")
    s.add_argument("--initial-lr", type=number(minimum=0), default=1e-5, help="lr at step 0 of the warmup")
    s.add_argument("--min-lr", type=number(minimum=0), default=1e-5, help="lr the cosine decays to")
    s.add_argument("--weight-decay", type=number(minimum=0), default=0.1, help="AdamW weight decay")
    w = s.add_mutually_exclusive_group()
    w.add_argument("--warmup-steps", type=count(), default=None, help="warmup length in steps")
    w.add_argument(
        "--warmup-fraction", type=number(above=0, below=1), default=0.2, help="warmup length as a fraction of all steps"
    )
    s.add_argument(
        "--max-norm",
        type=number(above=0),
        default=1.0,
        help="gradient-norm clipping threshold (from the first post-warmup step)",
    )
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-freq", type=count(), default=5, help="evaluate every N steps")
    e.add_argument("--eval-iter", type=count(), default=1, help="batches per evaluation")
    c = p.add_argument_group("checkpoints")
    c.add_argument(
        "--save-every", type=count(), default=None, help="also checkpoint every N steps (always at each epoch end)"
    )
    c.add_argument("--keep-last", type=count(), default=2, help="checkpoints kept (124M: about 2 GB each)")
    c.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in OUT/checkpoints")
    c.add_argument("--overwrite", action="store_true", help="delete checkpoints of an earlier run in OUT/checkpoints")
    c.add_argument(
        "--sync-checkpoints",
        action="store_true",
        help="write checkpoints while training waits, instead of from a copy in the background "
        "(the copy costs one extra copy of weights and optimizer state in memory: ~2 GB for 124M)",
    )
    c.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: apply settings that differ from the checkpoint's run (refused otherwise)",
    )
    o = p.add_argument_group("switch plugins off")
    for name, what in [
        ("warmup", "LRWarmup"),
        ("cosine", "CosineDecay"),
        ("clip", "GradClip"),
        ("eval", "LossTracker"),
        ("sample", "SampleText"),
        ("progress", "ProgressBar"),
        ("checkpoint", "Checkpoint"),
    ]:
        o.add_argument(f"--no-{name}", action="store_true", help=f"run without {what}")
    o.add_argument(
        "--plugin",
        action="append",
        default=[],
        type=plugin_spec,
        metavar="NAME[:SETTING=VALUE,...]",
        help="also enable a plugin by name, built-in (early_stopping) or installed, with settings as Python "
        "literals: --plugin 'early_stopping:patience=2,min_delta=0.05' (repeatable; see `enginekit plugins`)",
    )
    p.add_argument(
        "--plot-lr", action="store_true", help="draw the chosen schedule to OUT/lr.png and exit without training"
    )
    args = p.parse_args(argv)
    if not str(args.out_text):  # Path("") would be the current folder: the classic unset variable
        p.error("--out: an empty path (an unset variable?); pass the folder for this run's files")
    args.out = Path(args.out_text)
    try:
        args.device = Engine.pick_device(args.device)
    except ValueError as exc:
        p.error(f"--device: {exc}")
    return args


def schedule_plugins(args: argparse.Namespace) -> list[object]:
    """The LR and clipping plugins for these settings; lengths resolve against the run's real total."""
    plugins: list[object] = []
    if not args.no_clip:
        plugins.append(GradClip(max_norm=args.max_norm, start_step=0 if args.no_warmup else "after_warmup"))
    if not args.no_cosine:
        plugins.append(CosineDecay(min_lr=args.min_lr))
    if not args.no_warmup:
        if args.warmup_steps is not None:
            plugins.append(LRWarmup(warmup_steps=args.warmup_steps, initial_lr=args.initial_lr))
        else:
            plugins.append(LRWarmup(warmup_fraction=args.warmup_fraction, initial_lr=args.initial_lr))
    return plugins


def build_plugins(args: argparse.Namespace) -> list[object]:
    plugins = schedule_plugins(args)
    if not args.no_eval:
        plugins.append(LossTracker(eval_freq=args.eval_freq, eval_iter=args.eval_iter, out_dir=args.out))
    if not args.no_sample:
        plugins.append(SampleText())
    if not args.no_progress:
        plugins.append(ProgressBar())
    plugins.extend(args.plugin)  # installed plugins, by name; the engine loads and validates them
    if not args.no_checkpoint:
        ckpt_dir = args.out / "checkpoints"
        plugins.append(
            Checkpoint(
                ckpt_dir,
                every_steps=args.save_every,
                keep_last=args.keep_last,
                resume=args.resume,
                overwrite=args.overwrite,
                allow_changes=args.allow_changes,
                async_write=not args.sync_checkpoints,
            )
        )
    return plugins


def plot_schedule(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """Draw the learning rate of every step for these settings, without a model (the testing kit's stand-in)."""
    plugins = [p for p in schedule_plugins(args) if not isinstance(p, GradClip)]
    run = drive(plugins, epochs=args.epochs, steps_per_epoch=steps_per_epoch, max_steps=args.max_steps, lr=args.peak_lr)
    args.out.mkdir(parents=True, exist_ok=True)
    if not plot_lrs(run.lrs, args.out / "lr.png"):
        print("error: matplotlib is not installed: pip install 'enginekit[plot]'", file=sys.stderr)
        return 1
    print(f"learning-rate schedule of {len(run.lrs)} steps written to {args.out / 'lr.png'}")
    return 0


def _stop_outside_fit(signum: int, frame: object) -> None:
    raise TrainingAborted(signum, second=False)


def main(argv: list[str] | None = None) -> int:
    # SIGTERM outside fit (which handles it itself) ends like Ctrl-C, through the finally clauses
    # that remove temporary files, instead of killing the process in the middle of a write
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop_outside_fit) if main_thread else None
    try:
        return run(argv)
    except TrainingAborted as exc:  # a second signal inside fit, or one outside it: the line names it
        print(f"{exc}{_newest_hint(argv)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside fit: one line, not a traceback
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _newest_hint(argv: list[str] | None) -> str:
    try:
        args = parse_args(argv)
    except SystemExit:
        return ""
    return "" if args.no_checkpoint else f"; checkpoints in {args.out / 'checkpoints'}, continue with --resume"


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_lr or int(os.environ.get("RANK", "0")) != 0:
        return train(args)
    try:  # one run per folder, checked before anything is built, found now and not when model.pt is written
        lock_folder(args.out)
    except FolderBusyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"error: --out {args.out}: cannot write there ({exc.strerror or exc}); pass a folder you can write to",
            file=sys.stderr,
        )
        return 2
    try:
        for leftover in args.out.glob(".model.pt.*.tmp"):  # a write cut off by kill -9; OUT is ours now
            leftover.unlink(missing_ok=True)
        return train(args)
    finally:
        unlock_folder(args.out)


def train(args: argparse.Namespace) -> int:
    cfg = CONFIGS[args.model]
    main_process = int(os.environ.get("RANK", "0")) == 0
    if args.resume and args.no_checkpoint:
        print("error: --resume needs checkpoints; drop --no-checkpoint", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    try:
        train_loader, val_loader = verdict_loaders(batch_size=args.batch_size, context_length=cfg["context_length"])
        steps_per_epoch = -(-len(train_loader) // args.grad_accum)
        if args.plot_lr:
            return plot_schedule(args, steps_per_epoch)
        model = GPTModel(cfg)
        device = args.device  # resolved and checked by parse_args
        # fused AdamW: one kernel for all parameters on CUDA; the default elsewhere
        fused = True if device.type == "cuda" else None
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.peak_lr, weight_decay=args.weight_decay, fused=fused)
        if device.type == "cuda":
            train_loader, val_loader = verdict_loaders(
                batch_size=args.batch_size, context_length=cfg["context_length"], pin_memory=True
            )
        engine = Engine(
            torch.compile(model) if args.compile else model,
            optimizer,
            train_loader,
            val_loader,
            plugins=build_plugins(args),
            device=device,
            precision=args.precision,
            grad_accum_steps=args.grad_accum,
        )
    except (ValueError, ImportError, TypeError) as exc:  # a bad setting, an unknown or broken --plugin
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in model.parameters())
    engine.print(f"GPT {args.model}: {n_params:,} parameters on {engine.device}, {args.precision}")
    engine.print("plugins:")
    for name, plugin in engine.plugins.items():
        settings = ", ".join(f"{k}={v!r}" for k, v in plugin_settings(plugin).items())
        engine.print(f"  {name:<15} {type(plugin).__name__}({settings})")
    start = time.perf_counter()
    try:
        state = engine.fit(epochs=args.epochs, max_steps=args.max_steps)
    except TrainingInterrupted as exc:
        saved = "" if args.no_checkpoint else f"; checkpoint in {args.out / 'checkpoints'}, continue with --resume"
        print(f"{exc}{saved}", file=sys.stderr)
        return exc.exit_code
    except NonFiniteLossError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except CheckpointWriteError as exc:  # nothing was saved for that moment: say so in the status too
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except (ValueError, PluginError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    checkpoint = next((p for p in engine.plugins.values() if isinstance(p, Checkpoint)), None)
    if main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        # written again when resumed finished too: a kill between the last checkpoint and model.pt left none
        atomic_write(args.out / "model.pt", lambda f: torch.save(model.state_dict(), f))
        if checkpoint is not None and checkpoint.resumed_step is not None and checkpoint.resumed_step == state.step:
            engine.print(
                f"already finished: {state.step} of {state.total_steps} steps were done before, none was left to "
                f"run (pass a larger --epochs or --max-steps to go on); weights in {args.out / 'model.pt'}"
            )
            return 0
        engine.print(
            f"done: {state.step} steps, {state.tokens_seen:,} tokens in {elapsed:.1f} s; "
            f"weights in {args.out / 'model.pt'}"
        )
    return 0


if __name__ == "__main__":
    code = main()
    if code in (130, 143):
        # Stopped by a signal: every file is closed and synced, and the interpreter's own shutdown
        # after an interrupted step aborted now and then in torch's C++ teardown ("terminate called
        # without an active exception", status 134 instead of 143), so the process ends here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
