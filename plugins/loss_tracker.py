"""Periodic train/validation evaluation and the book's loss and learning-rate records."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from enginekit import Engine
from enginekit.hookspec import hookimpl
from enginekit.plugin_api import atomic_write, check_count

METRICS_FILE = "metrics.jsonl"


class LossTracker:
    """Every ``eval_freq`` steps, the mean loss over ``eval_iter`` batches of both loaders.

    As the book's ``train_model``: evaluates when ``step % eval_freq == 0`` (step 0 included),
    prints ``Ep 1 (Iter 000000): Train loss 10.969, Val loss 10.938``, and keeps the lists
    ``train_model`` returns: ``train_losses``, ``val_losses``, ``tokens_seen`` (one entry per
    evaluation) and ``lrs`` (the learning rate of every step, from the metrics channel).

    Each evaluation is published through :meth:`Engine.publish_evaluation`: ``train_loss`` and
    ``val_loss`` land on ``engine.metrics`` and every ``after_evaluate`` implementation sees
    them in the same step. Then one row is recorded for every step with an evaluation, its own
    or any other plugin's (whatever reaches ``after_evaluate``, at any step): ``step``,
    ``epoch``, ``tokens_seen`` and every metric any plugin published for that step (``lr``,
    ``step_loss``, ``grad_norm``, ``train_loss``, a perplexity, ...), one row per step even when
    several evaluators reported in it. The row is made after every other plugin's
    ``after_step`` (a ``wrapper=True`` implementation), so what another plugin publishes there is
    in it whatever the registration order; an evaluation outside a step's ``after_step`` (in
    ``after_epoch``, say) gets its row at once, merged into that step's row if it has one.
    ``train_losses``, ``val_losses`` and ``tokens_seen`` list LossTracker's own evaluations.

    With ``out_dir``: appends each row to ``out_dir/metrics.jsonl`` as it happens and, when fit
    ends, draws ``losses.png`` (loss against epochs, tokens seen on a second axis) and
    ``lr.png`` if matplotlib is installed (``pip install "enginekit[plot]"``).
    """

    def __init__(self, eval_freq: int = 5, eval_iter: int = 1, out_dir: str | os.PathLike[str] | None = None) -> None:
        check_count("LossTracker: ", "eval_freq", eval_freq)
        check_count("LossTracker: ", "eval_iter", eval_iter)
        self.eval_freq = eval_freq
        self.eval_iter = eval_iter
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.records: list[dict[str, Any]] = []
        self.lrs: list[float] = []
        self._rewrite = True
        self._steps_per_epoch = 1
        self._in_after_step = False
        self._evaluated: int | None = None  # the step another evaluator reported for, pending its row

    def _own(self) -> list[dict[str, Any]]:
        """Rows of LossTracker's own evaluations (another evaluator's rows lack these losses)."""
        return [r for r in self.records if "train_loss" in r and "val_loss" in r]

    @property
    def train_losses(self) -> list[float]:
        return [r["train_loss"] for r in self._own()]

    @property
    def val_losses(self) -> list[float]:
        return [r["val_loss"] for r in self._own()]

    @property
    def tokens_seen(self) -> list[int]:
        return [r["tokens_seen"] for r in self._own()]

    @hookimpl
    def before_fit(self, engine: Engine) -> None:
        self._steps_per_epoch = engine.state.steps_per_epoch
        if self.out_dir is not None and engine.state.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._rewrite = True
        self._in_after_step, self._evaluated = False, None

    @hookimpl(wrapper=True)
    def after_step(self, engine: Engine, loss: Any) -> Generator[None, Any, Any]:
        self._in_after_step = True
        try:
            result = yield  # every other plugin's after_step runs first: its numbers join this step's row
        finally:
            self._in_after_step = False
        st, metrics = engine.state, engine.metrics
        self.lrs.append(metrics["lr"])
        if st.step % self.eval_freq == 0:
            train_loss = engine.evaluate(engine.train_loader, self.eval_iter)
            val_loader = engine.val_loader
            val_loss = engine.evaluate(val_loader, self.eval_iter) if val_loader is not None else math.nan
            self._in_after_step = True  # our own report: its row is made right here
            try:
                engine.publish_evaluation({"train_loss": train_loss, "val_loss": val_loss})
            finally:
                self._in_after_step = False
            row: dict[str, Any] = {"step": st.step, "epoch": st.epoch, "tokens_seen": st.tokens_seen}
            row.update(train_loss=metrics["train_loss"], val_loss=metrics["val_loss"])
            row.update({k: v for k, v in metrics.at(st.step).items() if k not in row})
            self._evaluated = None
            self._add_row(engine, row)
            engine.print(
                f"Ep {st.epoch + 1} (Iter {st.step:06d}): Train loss {train_loss:.3f}, Val loss {val_loss:.3f}"
            )
        elif self._evaluated == st.step:  # another evaluator reported in this step's after_step
            self._evaluated = None
            self._add_row(engine, self._row_of(engine, st.step))
        return result

    @hookimpl
    def after_evaluate(self, engine: Engine, metrics: dict[str, float]) -> None:
        step = engine.metrics.step  # the step the results are tagged with
        if self._in_after_step and step == engine.state.step:
            self._evaluated = step  # the row comes after every after_step, with all of the step's numbers
        else:  # outside a step's after_step (after_epoch, another wrapper after ours): a row now
            self._add_row(engine, self._row_of(engine, step))

    def _row_of(self, engine: Engine, step: int) -> dict[str, Any]:
        st = engine.state
        row: dict[str, Any] = {"step": step, "epoch": st.epoch, "tokens_seen": st.tokens_seen}
        row.update({k: v for k, v in engine.metrics.at(step).items() if k not in row})
        return row

    def _add_row(self, engine: Engine, row: dict[str, Any]) -> None:
        """Append ``row``, or merge it into the last row when that is the same step's (one row per step)."""
        if self.records and self.records[-1]["step"] == row["step"]:
            last = self.records[-1]
            last.update({k: v for k, v in row.items() if k not in ("step", "epoch", "tokens_seen")})
            self._rewrite = True  # the file's last line changes: rewritten from memory
            self._write(engine, None)
            return
        self.records.append(row)
        self._write(engine, row)

    def _write(self, engine: Engine, record: dict[str, Any] | None) -> None:
        if self.out_dir is None or not engine.state.is_main:
            return
        path = self.out_dir / METRICS_FILE
        if self._rewrite or record is None:
            # A fresh or resumed run rewrites the file from memory, dropping rows of lost steps.
            rows = "".join(json.dumps(r) + "\n" for r in self.records).encode()
            atomic_write(path, lambda f: f.write(rows))
            self._rewrite = False
            return
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @hookimpl
    def after_fit(self, engine: Engine) -> None:
        if self._rewrite and self.records:  # a resumed run with no new row: the file may hold rows of lost steps
            self._write(engine, None)
        if self.out_dir is None or not engine.state.is_main or not self.records:
            return
        try:
            from matplotlib.figure import Figure
        except ImportError:
            engine.print("LossTracker: matplotlib is not installed, no plots drawn (pip install 'enginekit[plot]')")
            return
        epochs_seen = [r["step"] / self._steps_per_epoch for r in self._own()]
        fig = Figure(figsize=(5, 3))
        ax1 = fig.subplots()
        ax1.plot(epochs_seen, self.train_losses, label="Training loss")
        ax1.plot(epochs_seen, self.val_losses, linestyle="-.", label="Validation loss")
        ax1.set_xlabel("Epochs")
        ax1.set_ylabel("Loss")
        ax1.legend(loc="upper right")
        ax2 = ax1.twiny()
        ax2.plot(self.tokens_seen, self.train_losses, alpha=0)  # invisible: only aligns the token axis
        ax2.set_xlabel("Tokens seen")
        fig.tight_layout()
        fig.savefig(self.out_dir / "losses.png")
        plot_lrs(self.lrs, self.out_dir / "lr.png")

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "lrs": list(self.lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.lrs = list(state["lrs"])
        self._rewrite = True


def plot_lrs(lrs: list[float], path: str | os.PathLike[str]) -> bool:
    """Draw learning rate against step to ``path``; False when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    ax.plot(range(len(lrs)), lrs)
    ax.set_xlabel("Steps")
    ax.set_ylabel("Learning rate")
    fig.tight_layout()
    fig.savefig(path)
    return True
