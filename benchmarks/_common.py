"""Shared pieces of the benchmarks: model sizes, real batches, the plain loop they are compared to."""

from __future__ import annotations

import math
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from enginekit import Engine
from enginekit.data import gpt2_tokenizer, load_verdict
from enginekit.gpt import GPT_CONFIG_124M, GPTModel
from enginekit.plugins import CosineDecay, GradClip, LRWarmup, cosine_lr, warmup_lr

BASE = {"vocab_size": 50257, "drop_rate": 0.1, "qkv_bias": False}
CONFIGS: dict[str, dict[str, Any]] = {
    # a few milliseconds per step: a small vocabulary keeps the output layer from dominating
    "small": {**BASE, "vocab_size": 2048, "context_length": 64, "emb_dim": 64, "n_heads": 4, "n_layers": 2},
    # the book's vocabulary with everything else tiny (about 20 ms per step here)
    "tiny": {**BASE, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2},
    "124M": dict(GPT_CONFIG_124M),
}
PEAK, INITIAL, MIN_LR = 1e-3, 1e-5, 1e-5


def machine() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = "avx512_bf16" if "avx512_bf16" in f.read() else "no avx512_bf16"
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, {flags}, torch {torch.__version__}"


def real_batches(cfg: dict[str, Any], n: int, batch_size: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` batches of consecutive windows of the bundled story (wrapping around)."""
    ids = torch.tensor(gpt2_tokenizer().encode(load_verdict()))
    ctx = cfg["context_length"]
    out = []
    for i in range(n):
        rows = []
        for j in range(batch_size):
            start = ((i * batch_size + j) * ctx) % (len(ids) - ctx - 1)
            rows.append(ids[start : start + ctx + 1])
        block = torch.stack(rows) % cfg["vocab_size"]
        out.append((block[:, :-1].contiguous(), block[:, 1:].contiguous()))
    return out


def fresh_model(cfg: dict[str, Any], seed: int = 123) -> tuple[GPTModel, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = GPTModel(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=PEAK, weight_decay=0.1)


def schedule(total: int) -> tuple[list[object], int]:
    warmup = max(1, int(0.2 * total))
    return [
        LRWarmup(warmup_steps=warmup, initial_lr=INITIAL),
        CosineDecay(min_lr=MIN_LR),
        GradClip(1.0, warmup),
    ], warmup


def run_engine(
    cfg, batches, precision: str = "fp32", plugins: list[object] | None = None
) -> tuple[list[float], list[float]]:
    """Seconds of each of ``len(batches)`` engine steps (start to start) and the per-step losses."""
    model, opt = fresh_model(cfg)
    total = len(batches)
    plugin_list, _ = schedule(total) if plugins is None else (plugins, 0)
    losses: list[torch.Tensor] = []
    starts: list[float] = []

    class Clock:  # its own cost is counted against the engine
        def before_step(self, engine, batch):
            starts.append(time.perf_counter())

        def after_step(self, engine, loss):
            losses.append(loss)  # the tensor only: reading it is left to after the timing

    engine = Engine(model, opt, batches, plugins=[*plugin_list, Clock()], device="cpu", precision=precision)
    engine.fit(max_steps=total)
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:])], [float(x) for x in losses]


def run_plain(cfg, batches, precision: str = "fp32") -> tuple[list[float], list[float]]:
    """The same work as ``run_engine`` with the default plugins, written as a hand loop like the book's.

    It does not check the loss for NaN; the engine does (one host read per step), and pays for it here.
    """
    model, opt = fresh_model(cfg)
    total = len(batches)
    warmup = max(1, int(0.2 * total))
    params = list(model.parameters())
    losses: list[torch.Tensor] = []
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else None
    model.train()
    starts: list[float] = []
    for step, (x, y) in enumerate(batches):
        starts.append(time.perf_counter())
        lr = warmup_lr(step, warmup, INITIAL, PEAK) if step < warmup else cosine_lr(step, warmup, total, PEAK, MIN_LR)
        for group in opt.param_groups:
            group["lr"] = lr
        if amp is not None:
            with amp:
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        else:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        if step >= warmup:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:])], [float(x) for x in losses]


def summary(values: list[float]) -> tuple[float, float, float]:
    """Median, min and max."""
    return statistics.median(values), min(values), max(values)


def mean_interval(values: list[float]) -> tuple[float, float, float]:
    """The mean and its two-sided 95% interval (Student's t, its quantile from the Cornish-Fisher
    expansion: within 0.001 of the table from 10 values on, 0.007 with 5)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 5:  # the expansion is far off below that
        return mean, -math.inf, math.inf
    z, dof = 1.959964, n - 1
    t = (
        z
        + (z**3 + z) / (4 * dof)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3)
    )
    half = t * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def median_interval(values: list[float]) -> tuple[float, float, float]:
    """The median and a distribution-free interval holding the true median with at least 95%
    probability: the k-th smallest and k-th largest values, k from the binomial(n, 1/2) tails."""
    ordered, n = sorted(values), len(values)
    k, tail = 0, 0.0  # tail: P(fewer than k+1 of n values fall below the median)
    while True:
        nxt = tail + math.comb(n, k) / 2**n
        if nxt > 0.025:
            break
        k, tail = k + 1, nxt
    if k == 0:
        return statistics.median(values), -math.inf, math.inf
    return statistics.median(values), ordered[k - 1], ordered[n - k]
