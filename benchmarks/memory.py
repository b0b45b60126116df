"""Peak resident memory of an engine run against the plain loop, each in a fresh process.

python benchmarks/memory.py            # 124M model, 4 steps per process (~2 min)
python benchmarks/memory.py --quick    # small model
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

from _common import CONFIGS, machine, real_batches, run_engine, run_plain


def child(mode: str, name: str, steps: int) -> None:
    cfg = CONFIGS[name]
    batches = real_batches(cfg, steps)
    (run_engine if mode == "engine" else run_plain)(cfg, batches)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", nargs=3, metavar=("MODE", "MODEL", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    name, steps = ("small", 20) if args.quick else ("124M", 4)
    peaks: dict[str, list[int]] = {"engine": [], "plain": []}
    for _ in range(args.rounds):
        for mode in ("engine", "plain"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, name, str(steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks[mode].append(int(out.stdout.split()[-1]))
    print(f"machine: {machine()}")
    print(f"{name} model, {steps} steps per fresh process, {args.rounds} rounds")
    e, pl = sorted(peaks["engine"])[len(peaks["engine"]) // 2], sorted(peaks["plain"])[len(peaks["plain"]) // 2]
    print(f"{'mode':<7} {'peak RSS MiB (median)':>22} {'all runs':>30}")
    for mode, med in (("engine", e), ("plain", pl)):
        print(f"{mode:<7} {med / 1024:>22.1f} {', '.join(f'{v / 1024:.0f}' for v in peaks[mode]):>30}")
    print(f"engine / plain: {e / pl:.4f}")


if __name__ == "__main__":
    main()
