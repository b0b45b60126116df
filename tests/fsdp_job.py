"""A training job for the FSDP tests (2 CPU processes, gloo): the same run under either strategy.

    torchrun --standalone --nproc_per_node=2 tests/fsdp_job.py OUT --strategy {ddp,fsdp}
        [--batch-size B] [--grad-accum N] [--steps S] [--precision P] [--sample] [--checkpoint]
        [--checkpoint-dir DIR] [--resume] [--every-steps N] [--epochs N] [--allow-changes] [--dump]
        [--kill-at CKPT:N] [--engine NAME STRATEGY BATCH ACCUM ...] [--case NAME STRATEGY [KEY=VALUE ...] ...]

Dropout off and no shuffling, so runs of different strategies (or one process) see the same
data and can be compared number for number. Each rank writes OUT/result-rank<R>.pt itself:
its per-step losses (averaged over ranks by the engine), the evaluations, the gathered final
weights and, with --sample, the text SampleText printed. Each --engine trains one more engine in
the same processes (one process group, started once: the tests pay torchrun's start-up once)
and writes OUT/NAME/result-rank<R>.pt. Run without torchrun it is the single-process reference.

Checkpoints (tests/checkpointing/test_resharding.py): ``--checkpoint-dir`` (or ``--checkpoint``:
OUT/checkpoints) registers a Checkpoint; ``--steps 0`` trains whole epochs. ``--dump`` makes rank 0
write the whole model and optimizer state (gathered from the shards, by parameter name) at each
epoch-end save (OUT/saved-<step>.pt) and right after a resume (OUT/resumed.pt). ``--kill-at
ckpt-00000006:2`` SIGKILLs rank 0 on its 2nd write into that checkpoint folder (a crash mid-save).
Each ``--case`` is one more engine like ``--engine``, its options as KEY=VALUE: batch, accum, epochs,
steps, every (every_steps), resume (from OUT/NAME/checkpoints), from (a folder of checkpoints, or
another case's NAME: copied into this case's OUT/NAME/checkpoints, then resumed), allow
(allow_changes), dump, kill (SIGKILL as --kill-at: the job's last case). A run whose fit raises
a CheckpointError writes it to OUT/NAME/error.txt (rank 0) and the next run goes on; rank 0 prints
``== case NAME`` before each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from enginekit import Engine, hookimpl  # noqa: E402
from enginekit.data import create_dataloader, load_verdict  # noqa: E402
from enginekit.gpt import GPTModel  # noqa: E402
from enginekit.plugins import Checkpoint, CosineDecay, GradClip, LossTracker, LRWarmup, SampleText  # noqa: E402
from enginekit.plugins.checkpoint import CheckpointError  # noqa: E402

from conftest import TINY_CFG  # noqa: E402


class StepLosses:
    """Every step's loss and the evaluations, as floats (read on every rank: no rank-0-only collective)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.evals: list[dict[str, float]] = []
        self.grad_norms: list[float] = []

    @hookimpl
    def after_step(self, engine, loss):
        self.losses.append(float(loss))
        if "grad_norm" in engine.metrics.at(engine.state.step):
            self.grad_norms.append(engine.metrics["grad_norm"])

    @hookimpl
    def after_evaluate(self, engine, metrics):
        self.evals.append(dict(metrics))


def full_state(engine: Engine) -> dict:
    """The whole model's and optimizer's state by parameter name, gathered from the shards (every rank calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(engine.model, engine.optimizer, options=StateDictOptions(full_state_dict=True))
    st = engine.state
    return {
        "model": {k: v.detach().clone() for k, v in model.items()},
        "optim": optim["state"],
        "step": st.step,
        "epoch": st.epoch,
        "batches_in_epoch": st.batches_in_epoch,
        "world_size": st.world_size,
        "strategy": engine.strategy,
    }


class Dump:
    """With --dump: the whole state at each epoch-end save and right after a resume (rank 0 writes)."""

    def __init__(self, out: Path, checkpoint: Checkpoint) -> None:
        self.out, self.checkpoint = out, checkpoint

    @hookimpl(wrapper=True, tryfirst=True)  # outermost: Checkpoint has resumed when the yield returns
    def before_fit(self, engine):
        result = yield
        if self.checkpoint.resumed_from is not None:
            self._write(engine, "resumed.pt", resumed_from=self.checkpoint.resumed_from.name)
        return result

    @hookimpl(trylast=True)  # after Checkpoint's on_save_point
    def on_save_point(self, engine, reason):
        if reason == "epoch" and self.checkpoint.last_saved == engine.state.step:
            self._write(engine, f"saved-{engine.state.step:08d}.pt")

    def _write(self, engine: Engine, name: str, **extra: object) -> None:
        state = full_state(engine)
        if engine.state.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            torch.save({**state, **extra}, self.out / name)


def kill_at(spec: str) -> None:
    """Rank 0 SIGKILLs itself on its N-th write into checkpoint folder CKPT (``CKPT:N``): a crash mid-save."""
    from enginekit.checkpointing import dcp as backend

    if int(os.environ.get("RANK", "0")) != 0:
        return
    folder, nth = spec.split(":")
    original = backend._HashingStream.write
    count = 0

    def write(self, data):
        nonlocal count
        if f"/{folder}/" in str(getattr(self.f, "name", "")):
            count += 1
            if count == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)
        return original(self, data)

    backend._HashingStream.write = write


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


RUN_OPTIONS = {"batch", "accum", "epochs", "steps", "every", "from", "resume", "allow", "dump", "kill"}


def run_options(args: argparse.Namespace, name: str, strategy: str, options: list[str]) -> argparse.Namespace:
    """This --case's settings: the job's defaults and its KEY=VALUE options (refused if unknown)."""
    opts = dict(o.split("=", 1) if "=" in o else (o, "1") for o in options)
    unknown = set(opts) - RUN_OPTIONS
    if unknown:
        raise SystemExit(f"--case {name}: unknown option(s) {sorted(unknown)}; known: {sorted(RUN_OPTIONS)}")
    run = argparse.Namespace(**vars(args))
    run.strategy = strategy
    run.batch_size = int(opts.get("batch", args.batch_size))
    run.grad_accum = int(opts.get("accum", args.grad_accum))
    run.epochs = int(opts.get("epochs", args.epochs))
    run.steps = int(opts.get("steps", args.steps))
    run.every_steps = int(opts["every"]) if "every" in opts else args.every_steps
    run.allow_changes = "allow" in opts or args.allow_changes
    run.dump = "dump" in opts or args.dump
    run.kill_at = opts.get("kill", args.kill_at)
    run.checkpoint_dir = args.out / name / "checkpoints"
    run.resume = "resume" in opts or args.resume
    if "from" in opts:  # resume from a copy: the source stays as it is for other runs
        source = Path(opts["from"]) if Path(opts["from"]).is_absolute() else args.out / opts["from"] / "checkpoints"
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.copytree(source, run.checkpoint_dir)
        barrier()
        run.resume = True
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--sample", action="store_true")
    p.add_argument("--checkpoint", action="store_true")
    p.add_argument("--checkpoint-dir", type=Path)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--every-steps", type=int)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--allow-changes", action="store_true")
    p.add_argument("--dump", action="store_true")
    p.add_argument("--kill-at", metavar="CKPT:N")
    p.add_argument("--engine", nargs=4, action="append", metavar=("NAME", "STRATEGY", "BATCH", "ACCUM"))
    p.add_argument("--case", nargs="+", action="append", metavar="NAME STRATEGY [KEY=VALUE]")
    args = p.parse_args()
    if args.checkpoint and args.checkpoint_dir is None:
        args.checkpoint_dir = args.out / "checkpoints"
    torch.set_num_threads(1)  # two ranks on two busy cores; and one thread sums alike in every run
    if not args.engine and not args.case:
        train(args, args.out)
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # ours, so no engine tears it down between the runs
    for name, strategy, batch, accum in args.engine or []:
        run = argparse.Namespace(**vars(args))
        run.strategy, run.batch_size, run.grad_accum = strategy, int(batch), int(accum)
        if args.checkpoint:
            run.checkpoint_dir = args.out / name / "checkpoints"
        train(run, args.out / name)
    for name, strategy, *options in args.case or []:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"== case {name}", flush=True)  # the tests split the output by case
        try:
            train(run_options(args, name, strategy, options), args.out / name)
        except CheckpointError as exc:  # the refusal is the result; the next run goes on in the same group
            if int(os.environ.get("RANK", "0")) == 0:
                (args.out / name).mkdir(parents=True, exist_ok=True)
                (args.out / name / "error.txt").write_text(str(exc))


def train(args: argparse.Namespace, out: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))

    torch.manual_seed(123)
    cfg = {**TINY_CFG, "drop_rate": 0.0}
    text = load_verdict()[:3000]
    split = int(0.9 * len(text))
    ctx = cfg["context_length"]
    train = create_dataloader(text[:split], batch_size=args.batch_size, max_length=ctx, stride=ctx, shuffle=False)
    val = create_dataloader(text[split:], batch_size=2, max_length=ctx, stride=ctx, shuffle=False, drop_last=False)
    model = GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    steps = StepLosses()
    plugins: list[object] = [
        LRWarmup(warmup_steps=3, initial_lr=1e-5),
        CosineDecay(min_lr=1e-5),
        GradClip(max_norm=1.0, start_step=3),
        LossTracker(eval_freq=4, eval_iter=2),
        steps,
    ]
    sampler = SampleText(max_new_tokens=5)
    if args.sample:
        plugins.append(sampler)
    if args.checkpoint_dir is not None:
        checkpoint = Checkpoint(
            args.checkpoint_dir, every_steps=args.every_steps, resume=args.resume, allow_changes=args.allow_changes
        )
        plugins.append(checkpoint)
        if args.dump:
            plugins.append(Dump(out, checkpoint))
        if args.kill_at:
            kill_at(args.kill_at)
    engine = Engine(
        model,
        optimizer,
        train,
        val,
        plugins=plugins,
        device="cpu",
        grad_accum_steps=args.grad_accum,
        precision=args.precision,
        strategy=args.strategy,
    )
    engine.fit(epochs=args.epochs, max_steps=args.steps or None)
    weights = engine.model_state_dict()  # gathered from the shards under FSDP, on every rank
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": weights,
            "steps": engine.state.step,
            "world_size": engine.state.world_size,
            "losses": steps.losses,
            "evals": steps.evals,
            "grad_norms": steps.grad_norms,
            "samples": sampler.samples,
            "sharded": type(model).__name__,
        },
        out / f"result-rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
