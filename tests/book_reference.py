"""An independent, explicit re-statement of the book's chapter-4 GPT, used as the reference in tests.

It spells out the math the book uses (masked softmax attention, biased-variance layer norm,
tanh GELU) and creates its layers in the book's order, so that tests can compare enginekit's
fused implementation against it: same initial weights under one seed, same state-dict keys,
same eval-mode outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RefAttention(nn.Module):
    def __init__(self, emb: int, ctx: int, heads: int, drop: float, qkv_bias: bool) -> None:
        super().__init__()
        self.heads, self.hd = heads, emb // heads
        self.W_query = nn.Linear(emb, emb, bias=qkv_bias)
        self.W_key = nn.Linear(emb, emb, bias=qkv_bias)
        self.W_value = nn.Linear(emb, emb, bias=qkv_bias)
        self.out_proj = nn.Linear(emb, emb)
        self.dropout = nn.Dropout(drop)
        self.register_buffer("mask", torch.triu(torch.ones(ctx, ctx), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        q = self.W_query(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k = self.W_key(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        v = self.W_value(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        scores = q @ k.transpose(2, 3)
        scores = scores.masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / k.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).contiguous().view(b, t, e))


class RefLayerNorm(nn.Module):
    def __init__(self, emb: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(emb))
        self.shift = nn.Parameter(torch.zeros(emb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + 1e-5) + self.shift


class RefGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class RefFeedForward(nn.Module):
    def __init__(self, emb: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(emb, 4 * emb), RefGELU(), nn.Linear(4 * emb, emb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class RefBlock(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        emb = cfg["emb_dim"]
        self.att = RefAttention(emb, cfg["context_length"], cfg["n_heads"], cfg["drop_rate"], cfg["qkv_bias"])
        self.ff = RefFeedForward(emb)
        self.norm1 = RefLayerNorm(emb)
        self.norm2 = RefLayerNorm(emb)
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_shortcut(self.att(self.norm1(x))) + x
        return self.drop_shortcut(self.ff(self.norm2(x))) + x


class RefGPT(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[RefBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = RefLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))
        return self.out_head(self.final_norm(self.trf_blocks(x)))
