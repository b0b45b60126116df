"""Pretrain the book's GPT on "The Verdict" with appendix D's techniques, as enginekit plugins.

The defaults reproduce the book's final appendix-D run: the 124M model at context 256,
AdamW(lr=1e-3, weight_decay=0.1), batch 2, 15 epochs (135 steps), 20% linear warmup from 1e-5,
cosine decay to 1e-5, gradient clipping at 1.0 after warmup, evaluation every 5 steps on one
batch, a greedy sample after each epoch, a checkpoint after each epoch.

    python examples/pretrain_verdict.py                      # the book's run (2-core CPU: ~11 min)
    python examples/pretrain_verdict.py --model tiny --epochs 2 --out runs/tiny
    python examples/pretrain_verdict.py --resume             # continue after an interruption
    python examples/pretrain_verdict.py --init gpt2 --export runs/verdict/hf   # from GPT-2's weights, out to HF
    enginekit prepare my_texts/ --out corpus/ && python examples/pretrain_verdict.py --data corpus/ --max-steps 5000
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

from enginekit import (
    Engine,
    NonFiniteLossError,
    TrainingAborted,
    TrainingInterrupted,
    describe_error,
    plugin_failure,
)
from enginekit.data import corpus_loaders, verdict_loaders
from enginekit.fast import FAST, adamw, allow_tf32
from enginekit.gpt import (
    GPT_CONFIG_124M,
    GPT_CONFIG_TINY,
    GPTModel,
    crop_context,
    load_pretrained,
    pad_output_head,
    save_pretrained,
    unpadded_state_dict,
)
from enginekit.plugin_api import FolderBusyError, atomic_write, lock_folder, lr_preview, plugin_settings, unlock_folder
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
        description="Pretrain GPT on The Verdict (or your own text, --data) with enginekit (appendix D of the book).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--model", choices=sorted(CONFIGS), default="124M", help="124M: the book's model; tiny: trains in seconds"
    )
    g.add_argument(
        "--init",
        metavar="PATH_OR_NAME",
        default=None,
        help="start from GPT-2 weights: a Hugging Face GPT-2 folder, its model.safetensors, or a hub name "
        "(gpt2, gpt2-medium, gpt2-large, gpt2-xl); the model's size comes from the checkpoint, not --model",
    )
    g.add_argument(
        "--context-length",
        type=count(),
        default=None,
        help="tokens per training window (default: the --model's; with --init the checkpoint's, at most 256: "
        "the story's validation part holds about 500 tokens, too few for GPT-2's 1024)",
    )
    g.add_argument("--export", type=Path, default=None, help="at the end, also write a Hugging Face GPT-2 folder here")
    g.add_argument(
        "--data",
        type=Path,
        default=None,
        metavar="DIR",
        help="train on a corpus made by `enginekit prepare SOURCES --out DIR` (its validation split for "
        "evaluation) instead of the bundled story; default: The Verdict, exactly as the book",
    )
    g.add_argument(
        "--epochs",
        type=count(),
        default=15,
        help="passes over the training text: right for The Verdict (9 steps each); a big --data corpus has "
        "millions of steps per epoch, so give --max-steps there (the run ends at whichever comes first, and "
        "warmup and cosine plan against that length)",
    )
    g.add_argument(
        "--max-steps",
        type=count(),
        default=None,
        help="stop after this many optimizer steps (the unit for big corpora)",
    )
    g.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:1, mps")
    g.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=None,
        help="fp32 (the default), bf16: autocast on CPU/CUDA; fp16: autocast + GradScaler, for CUDA "
        "(on CPU only to test that path)",
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
    g.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="under torchrun: replicate or shard")
    f = p.add_argument_group("speed (each off by default: the defaults are the book's run, bit for bit)")
    f.add_argument(
        "--compile", action="store_true", help="torch.compile the model (not the loop); the first step is slow"
    )
    f.add_argument(
        "--adamw",
        choices=["auto", "default", "fused", "foreach"],
        default="auto",
        help="AdamW implementation; auto: fused on CUDA, torch's default (the book's) elsewhere",
    )
    f.add_argument("--tf32", action="store_true", help="TF32 matmuls on CUDA (no effect on a CPU)")
    f.add_argument(
        "--pad-vocab", type=count(), default=None, metavar="N", help="pad the output head to a multiple of N (64)"
    )
    f.add_argument(
        "--fast",
        action="store_true",
        help="all of the above (compile, fused AdamW, TF32, --pad-vocab 64) and bf16 unless --precision is given",
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
    if args.fast:
        args.compile, args.tf32 = FAST["compile"], FAST["tf32"]
        args.adamw = FAST["adamw"] if args.adamw == "auto" else args.adamw
        args.pad_vocab = args.pad_vocab or FAST["vocab_padding_multiple"]
        args.precision = args.precision or FAST["precision"]
    args.precision = args.precision or "fp32"
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
    """Draw the learning rate of every step for these settings, without a model (``lr_preview``)."""
    plugins = [p for p in schedule_plugins(args) if not isinstance(p, GradClip)]
    lrs = lr_preview(
        plugins, epochs=args.epochs, steps_per_epoch=steps_per_epoch, max_steps=args.max_steps, lr=args.peak_lr
    )
    args.out.mkdir(parents=True, exist_ok=True)
    if not plot_lrs(lrs, args.out / "lr.png"):
        print("error: matplotlib is not installed: pip install 'enginekit[plot]'", file=sys.stderr)
        return 1
    print(f"learning-rate schedule of {len(lrs)} steps written to {args.out / 'lr.png'}")
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


def data_loaders(args: argparse.Namespace, cfg: dict, pin_memory: bool = False) -> tuple:
    """The bundled story (the book's loaders, shuffled by torch's global RNG), or a prepared --data corpus."""
    if args.data is None:
        return verdict_loaders(batch_size=args.batch_size, context_length=cfg["context_length"], pin_memory=pin_memory)
    return corpus_loaders(args.data, args.batch_size, cfg["context_length"], seed=args.seed, pin_memory=pin_memory)


def train(args: argparse.Namespace) -> int:
    cfg = CONFIGS[args.model]
    main_process = int(os.environ.get("RANK", "0")) == 0
    if args.resume and args.no_checkpoint:
        print("error: --resume needs checkpoints; drop --no-checkpoint", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    pretrained = None
    if args.init is not None:  # GPT-2's weights; loading draws nothing from the RNG
        try:
            pretrained, cfg = load_pretrained(args.init, log=print if main_process else None)
            context = args.context_length or min(cfg["context_length"], 256)
            if context != cfg["context_length"]:
                pretrained = crop_context(pretrained, context)
                cfg = pretrained.cfg
        except (OSError, ValueError, ImportError) as exc:
            print(f"error: --init: {exc}", file=sys.stderr)
            return 2
    elif args.context_length is not None:
        cfg = {**cfg, "context_length": args.context_length}
    try:
        train_loader, val_loader = data_loaders(args, cfg)
        steps_per_epoch = -(-len(train_loader) // args.grad_accum)
        if args.plot_lr:
            return plot_schedule(args, steps_per_epoch)
        if pretrained is None:
            model = GPTModel({**cfg, "vocab_padding_multiple": args.pad_vocab} if args.pad_vocab else cfg)
        else:
            model = pad_output_head(pretrained, args.pad_vocab) if args.pad_vocab else pretrained
        device = args.device  # resolved and checked by parse_args
        if args.tf32:
            allow_tf32()
        # auto: fused AdamW (one kernel for all parameters) on CUDA; torch's default, the book's, elsewhere
        implementation = args.adamw if args.adamw != "auto" else "fused" if device.type == "cuda" else "default"
        optimizer = adamw(
            model.parameters(), lr=args.peak_lr, weight_decay=args.weight_decay, implementation=implementation
        )
        if device.type == "cuda":
            train_loader, val_loader = data_loaders(args, cfg, pin_memory=True)
        engine = Engine(
            model,
            optimizer,
            train_loader,
            val_loader,
            plugins=build_plugins(args),
            device=device,
            precision=args.precision,
            grad_accum_steps=args.grad_accum,
            compile=args.compile,
            strategy=args.strategy,
        )
    except (ValueError, ImportError, TypeError) as exc:  # a bad setting, an unknown or broken --plugin
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in model.parameters())
    what = f"GPT {args.model}" if args.init is None else f"GPT from {args.init} (context {cfg['context_length']})"
    engine.print(f"{what}: {n_params:,} parameters on {engine.device}, {args.precision}")
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
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 4
    except Exception as exc:  # a bad setting, or any plugin's failure: one line naming it
        if not isinstance(exc, (ValueError, CheckpointError)) and plugin_failure(exc) is None:
            raise
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    # with fsdp gathered from every rank's shard (every rank calls it); the book's shapes even with
    # --pad-vocab, so the book's code loads model.pt as it is
    weights = unpadded_state_dict(model, engine.model_state_dict())
    checkpoint = next((p for p in engine.plugins.values() if isinstance(p, Checkpoint)), None)
    if main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        # written again when resumed finished too: a kill between the last checkpoint and model.pt left none
        atomic_write(args.out / "model.pt", lambda f: torch.save(weights, f))
        if checkpoint is not None and checkpoint.resumed_step is not None and checkpoint.resumed_step == state.step:
            engine.print(
                f"already finished: {state.step} of {state.total_steps} steps were done before, none was left to "
                f"run (pass a larger --epochs or --max-steps to go on); weights in {args.out / 'model.pt'}"
            )
            return 0
        if args.export is not None:
            try:
                exported = GPTModel({k: v for k, v in model.cfg.items() if k != "vocab_padding_multiple"})
                exported.load_state_dict(weights)  # the whole weights, also when fsdp sharded them
                engine.print(f"Hugging Face GPT-2 folder in {save_pretrained(exported, args.export)}")
            except (OSError, ImportError) as exc:  # the weights are safe in model.pt; say so
                print(f"error: --export {args.export}: {exc}; weights in {args.out / 'model.pt'}", file=sys.stderr)
                return 1
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
