"""What checkpoints cost the main job: fit time with per-epoch checkpoints written synchronously,
in the background (the default), and with none, in interleaved rounds; plus each run's peak RSS.

    python benchmarks/checkpoint_cost.py                       # 124M, 3 epochs (27 steps, 3 saves) x 2 rounds
    python benchmarks/checkpoint_cost.py --epochs 15 --rounds 1 # the whole main job
    python benchmarks/checkpoint_cost.py --epochs 15 --rounds 2 --modes none,async

Each run is the example in a fresh process (``--no-progress --no-sample``, eval as in the book);
its fit time is the one the example prints. The cost of a mode is its fit time over the
no-checkpoint run's in the same round. Each run's CPU seconds (all its threads) show what the
saves need: the extra CPU per save against the no-checkpoint run, beside the fit seconds lost per
save. When training keeps every core busy, a background writer can only hide in what is left.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine

ROOT = Path(__file__).resolve().parents[1]
MODES = {"none": ["--no-checkpoint"], "sync": ["--sync-checkpoints"], "async": []}


PEAK = (
    "import resource, runpy, sys\n"
    "sys.argv = sys.argv[1:]  # the example's own argv\n"
    "code = 0\n"
    "try:\n"
    "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as exc:\n"
    "    code = exc.code\n"
    "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print('peak-rss-kib', usage.ru_maxrss, 'cpu-s', usage.ru_utime + usage.ru_stime)\n"
    "sys.exit(code)\n"
)


def run(mode: str, epochs: int, model: str) -> tuple[float, float, float, float]:
    """Fit seconds, peak RSS (GiB), CPU seconds (all threads) and wall seconds of one run of the
    example in a fresh process."""
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as out:
        args = ["--model", model, "--epochs", str(epochs), "--no-progress", "--no-sample", "--keep-last", "1"]
        script = str(ROOT / "examples" / "pretrain_verdict.py")
        cmd = [sys.executable, "-c", PEAK, script, *args, *MODES[mode], "--out", out]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"{mode} run failed: {proc.stderr[-2000:]}")
        found = re.search(r"done: \d+ steps, [\d,]+ tokens in ([\d.]+) s", proc.stdout)
        peak = re.search(r"peak-rss-kib (\d+) cpu-s ([\d.]+)", proc.stdout)
        assert found and peak, proc.stdout[-2000:]
        return float(found.group(1)), int(peak.group(1)) / 2**20, float(peak.group(2)), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--model", default="124M", choices=["124M", "tiny"])
    p.add_argument("--modes", default="none,sync,async", help="comma-separated, 'none' included (default: all three)")
    args = p.parse_args()
    order = args.modes.split(",")
    if "none" not in order or not set(order) <= set(MODES):
        raise SystemExit(f"--modes: a comma-separated subset of {', '.join(MODES)} that includes none")
    print(f"machine: {machine()}")
    times: dict[str, list[float]] = {m: [] for m in order}
    rss: dict[str, list[float]] = {m: [] for m in order}
    cpu: dict[str, list[float]] = {m: [] for m in order}
    busy: dict[str, list[float]] = {m: [] for m in order}
    cores = os.cpu_count() or 1
    for r in range(args.rounds):
        for mode in order[r % len(order) :] + order[: r % len(order)]:
            seconds, peak, cpu_s, wall = run(mode, args.epochs, args.model)
            times[mode].append(seconds)
            rss[mode].append(peak)
            cpu[mode].append(cpu_s)
            busy[mode].append(cpu_s / (wall * cores))
            print(
                f"round {r + 1}: {mode:<5} fit {seconds:7.1f} s  peak RSS {peak:5.2f} GiB  "
                f"CPU {cpu_s:7.1f} s ({busy[mode][-1]:.0%} of {cores} cores over {wall:.0f} s)",
                flush=True,
            )
    print(f"\n{args.model}, {args.epochs} epochs, {args.rounds} interleaved rounds; cost = fit / no-checkpoint fit - 1")
    print(
        "extra CPU: the run's CPU seconds (every thread) minus the no-checkpoint run's in the same round, "
        f"per save ({args.epochs} saves); lost: the extra fit seconds per save"
    )
    for mode in order:
        costs = [t / n - 1 for t, n in zip(times[mode], times["none"])]
        extra = [(c - n) / args.epochs for c, n in zip(cpu[mode], cpu["none"])]
        lost = [(t - n) / args.epochs for t, n in zip(times[mode], times["none"])]
        print(
            f"{mode:<5} fit median {statistics.median(times[mode]):7.1f} s  "
            f"cost median {statistics.median(costs):+6.1%} [{min(costs):+6.1%} .. {max(costs):+6.1%}]  "
            f"peak RSS {max(rss[mode]):.2f} GiB  extra CPU {statistics.median(extra):5.2f} s/save  "
            f"lost {statistics.median(lost):5.2f} s/save  cores busy {statistics.median(busy[mode]):.0%}"
        )


if __name__ == "__main__":
    main()
