"""Training throughput and model-FLOPs utilisation of the 124M model through the engine.

Made for a GPU session (it measures the device's own bf16 matmul rate and reports MFU against
it), and runs on the CPU too as a smoke test:

    python benchmarks/throughput.py                         # CUDA: 124M, context 1024, bf16
    python benchmarks/throughput.py --compile               # the same with torch.compile
    python benchmarks/throughput.py --compile --fast        # and the fast preset (fused AdamW, TF32, padded head)
    python benchmarks/throughput.py --device cpu --context 128 --batch-size 1 --steps 3   # smoke

Model FLOPs per token follow the usual accounting for a decoder: 6 x the parameters that take
part in a matmul, forward and backward, plus 12 x layers x context x embedding for attention
scores and values. The book's model does not tie its output head to the token embedding, so both
embeddings are left out (they are lookups) and the head is counted (163.0M parameters, 123.6M in
matmuls: 855 MFLOP per token at context 1024). MFU = achieved model FLOP/s / measured matmul
FLOP/s of the same dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import CONFIGS, machine

from enginekit import Engine, hookimpl
from enginekit.fast import allow_tf32
from enginekit.gpt import GPTModel


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 20) -> float:
    """Best achieved FLOP/s of an n x n matmul on ``device``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(cfg: dict, model: GPTModel) -> float:
    lookups = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    params = sum(p.numel() for p in model.parameters()) - lookups
    return 6 * params + 12 * cfg["n_layers"] * cfg["context_length"] * cfg["emb_dim"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="timed steps (after 5 warm-up steps)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fast", action="store_true", help="fused AdamW, TF32, output head padded to a multiple of 64")
    p.add_argument("--matmul-size", type=int, default=None, help="default 8192 on CUDA, 1024 on CPU")
    args = p.parse_args()
    device = Engine.pick_device(args.device)
    cfg = {**CONFIGS["124M"], "context_length": args.context}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    peak = matmul_rate(device, dtype, args.matmul_size or (8192 if device.type == "cuda" else 1024))

    torch.manual_seed(0)
    model = GPTModel({**cfg, "vocab_padding_multiple": 64} if args.fast else cfg)
    if args.fast:
        allow_tf32()
    fused = True if device.type == "cuda" or args.fast else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    warmup = 5
    n = warmup + args.steps
    tokens = torch.randint(0, cfg["vocab_size"], (n * args.batch_size, args.context + 1))
    data = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, pin_memory=device.type == "cuda")
    stamps: list[float] = []

    class Clock:
        @hookimpl
        def before_step(self, engine, batch):
            if engine.state.step >= warmup:
                sync(device)  # only here, to time steps; the engine itself does not sync per step
                stamps.append(time.perf_counter())

    engine = Engine(
        model,
        optimizer,
        loader,
        plugins=[Clock()],
        device=device,
        precision=args.precision,
        compile=args.compile,
    )
    engine.fit(max_steps=n)
    sync(device)
    stamps.append(time.perf_counter())
    step_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    tok_s = args.batch_size * args.context / step_s
    achieved = tok_s * flops_per_token(cfg, model)
    print(
        f"machine: {machine()}; device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(
        f"124M, context {args.context}, batch {args.batch_size}, {args.precision}, "
        f"compile={args.compile}, fast={args.fast}: "
        f"{step_s * 1e3:.1f} ms/step (median of {args.steps}), {tok_s:,.0f} tokens/s"
    )
    print(
        f"model FLOP/s {achieved / 1e12:.2f} T; measured {args.precision} matmul rate {peak / 1e12:.2f} T; "
        f"MFU {achieved / peak:.1%}"
    )


if __name__ == "__main__":
    main()
