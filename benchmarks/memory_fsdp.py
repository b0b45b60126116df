"""Per-rank bytes of parameters, gradients and AdamW state under DDP and FSDP, 2 CPU ranks (gloo).

python benchmarks/memory_fsdp.py            # the book's 124M model (a few minutes on 2 busy cores)
python benchmarks/memory_fsdp.py --quick    # a small model

Each strategy runs in its own ``torchrun --nproc_per_node=2`` job: one real optimizer step of
the engine on short sequences (the sequence length changes activations, not these figures).
Each rank sums the bytes of the tensors it holds itself (a DTensor's local shard): the
parameters and the optimizer state after the step, the gradients in ``after_backward`` (the
engine frees them after the step). DDP's gradient buckets (one more copy of the gradients,
kept between steps) are not among them; the peak resident memory of each rank is printed too,
for context (it includes torch itself and the activations).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from enginekit import Engine, hookimpl
from enginekit.data import create_dataloader, load_verdict
from enginekit.gpt import GPT_CONFIG_124M, GPTModel

CONFIGS = {
    "124M": dict(GPT_CONFIG_124M),
    "small": {
        "vocab_size": 50257,
        "context_length": 64,
        "emb_dim": 64,
        "n_heads": 4,
        "n_layers": 4,
        "drop_rate": 0.0,
        "qkv_bias": False,
    },
}


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for ``t`` (its shard when ``t`` is a DTensor)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


class CountGrads:
    def __init__(self) -> None:
        self.bytes = 0

    @hookimpl
    def after_backward(self, engine: Engine) -> None:
        self.bytes = sum(local_bytes(p.grad) for p in engine.model.parameters() if p.grad is not None)


def child(strategy: str, name: str, out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(123)
    model: nn.Module = GPTModel(CONFIGS[name])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    loader = create_dataloader(load_verdict()[:4000], batch_size=1, max_length=32, stride=32, shuffle=False)
    grads = CountGrads()
    engine = Engine(model, optimizer, loader, plugins=[grads], device="cpu", strategy=strategy)
    engine.fit(max_steps=1)
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    row = {
        "rank": engine.state.rank,
        "world_size": engine.state.world_size,
        "params": sum(local_bytes(p) for p in model.parameters()),
        "grads": grads.bytes,
        "optimizer": sum(local_bytes(v) for v in state),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "n_params": sum(p.numel() for p in model.parameters()),  # a DTensor's numel is the whole tensor's
    }
    (out / f"{strategy}-rank{row['rank']}.json").write_text(json.dumps(row))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", nargs=3, metavar=("STRATEGY", "MODEL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]))
        return
    name = "small" if args.quick else "124M"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("ddp", "fsdp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            cmd += [__file__, "--child", strategy, name, tmp]
            subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
            rows[strategy] = [json.loads((Path(tmp) / f"{strategy}-rank{r}.json").read_text()) for r in (0, 1)]
    mib = 2**20
    print(f"{name} model ({rows['ddp'][0]['n_params']:,} parameters), 2 ranks, gloo on CPU, fp32, AdamW")
    print(
        f"{'strategy':<9} {'rank':>4} {'params MiB':>11} {'grads MiB':>10} {'AdamW MiB':>10} {'total MiB':>10} "
        f"{'peak RSS MiB':>13}"
    )
    totals = {}
    for strategy, ranks in rows.items():
        for r in ranks:
            total = r["params"] + r["grads"] + r["optimizer"]
            totals.setdefault(strategy, []).append(total)
            print(
                f"{strategy:<9} {r['rank']:>4} {r['params'] / mib:>11.1f} {r['grads'] / mib:>10.1f} "
                f"{r['optimizer'] / mib:>10.1f} {total / mib:>10.1f} {r['peak_rss'] / mib:>13.0f}"
            )
    print(f"fsdp / ddp, per rank (params + grads + AdamW): {max(totals['fsdp']) / max(totals['ddp']):.3f}")


if __name__ == "__main__":
    main()
