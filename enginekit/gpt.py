"""The book's GPT model (chapter 4), its text generator (chapter 5) and small text helpers.

Compatibility with the book is a contract, not a resemblance:

* the config dict uses the book's keys (``ctx_len`` from the print edition is accepted as a
  synonym of ``context_length``);
* ``state_dict()`` has the book's keys and shapes, including the ``att.mask`` buffers, so
  weights move both ways with a plain ``load_state_dict``;
* layers are created in the book's order, so one seed gives the book's initial weights;
* no weight tying: 163,009,536 parameters at context 1024, 162,419,712 at 256.

One opt-in departure, for speed: the config key ``vocab_padding_multiple`` (say 64) gives the
output head rows up to the next multiple, so its matmul has an aligned width (50,304 instead of
50,257); the logits of the padding ids are set to ``-inf``, so losses and generated text equal
the unpadded model's and the padding rows never get a gradient. Such a model's
``out_head.weight`` has the padded shape (:func:`unpadded_state_dict` gives the book's).

Attention runs through ``scaled_dot_product_attention`` (fused kernels on GPU, fewer
temporaries on CPU); in eval mode it equals the book's explicit masked-softmax math to float
tolerance. Layer norm and GELU use the fused functional forms of the book's formulas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # at run time they come through __getattr__ below, on first use
    from .pretrained import crop_context, load_pretrained, save_pretrained

__all__ = [
    "GPT_CONFIG_124M",
    "GPT_CONFIG_TINY",
    "GPTModel",
    "crop_context",
    "generate",
    "load_pretrained",
    "normalize_config",
    "pad_output_head",
    "padded_vocab_size",
    "save_pretrained",
    "unpadded_state_dict",
    "text_to_token_ids",
    "token_ids_to_text",
]

REQUIRED_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")

#: The 124M GPT-2 configuration as appendix D uses it (context shortened to 256 tokens).
GPT_CONFIG_124M: dict[str, Any] = {
    "vocab_size": 50257,
    "context_length": 256,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

#: A GPT small enough to train in seconds on a CPU: the book's vocabulary, everything else tiny.
#: The examples' ``--model tiny`` and the notebook use it.
GPT_CONFIG_TINY: dict[str, Any] = {
    "vocab_size": 50257,
    "context_length": 64,
    "emb_dim": 64,
    "n_heads": 4,
    "n_layers": 2,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


def normalize_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Return a checked copy of a book-style config, with ``ctx_len`` renamed to ``context_length``.

    Raises ``ValueError`` naming the offending key.
    """
    out = dict(cfg)
    if "ctx_len" in out:
        if "context_length" in out and out["context_length"] != out["ctx_len"]:
            raise ValueError(
                f"config has both 'ctx_len' ({out['ctx_len']}) and 'context_length' "
                f"({out['context_length']}); keep one of them"
            )
        out["context_length"] = out.pop("ctx_len")
    missing = [k for k in REQUIRED_KEYS if k not in out]
    if missing:
        raise ValueError(
            f"GPT config is missing key(s) {', '.join(repr(k) for k in missing)}; "
            f"a config needs {', '.join(REQUIRED_KEYS)} (see GPT_CONFIG_124M)"
        )
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"GPT config key {key!r} must be a positive int, got {value!r}")
    if out["emb_dim"] % out["n_heads"] != 0:
        raise ValueError(
            f"GPT config key 'emb_dim' ({out['emb_dim']}) must be divisible by 'n_heads' ({out['n_heads']})"
        )
    if not 0.0 <= float(out["drop_rate"]) < 1.0:
        raise ValueError(f"GPT config key 'drop_rate' must be in [0, 1), got {out['drop_rate']!r}")
    multiple = out.get("vocab_padding_multiple")
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
        raise ValueError(f"GPT config key 'vocab_padding_multiple' must be a positive int or None, got {multiple!r}")
    return out


def padded_vocab_size(vocab_size: int, multiple: int | None) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple`` (50,257 -> 50,304 for 64)."""
    if not multiple:
        return vocab_size
    return -(-vocab_size // multiple) * multiple


def pad_output_head(model: GPTModel, multiple: int) -> GPTModel:
    """``model`` (in place) with its output head padded to a multiple of ``multiple`` rows, its
    weights kept in the first rows: a model loaded unpadded (GPT-2's weights) on the fast path."""
    cfg = normalize_config({**model.cfg, "vocab_padding_multiple": multiple})
    rows = padded_vocab_size(model.vocab_size, multiple)
    old = model.out_head
    if rows != old.out_features:
        new = nn.Linear(old.in_features, rows, bias=False, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight[: old.out_features] = old.weight[: model.vocab_size]
            new.weight[old.out_features :].zero_()
        model.out_head = new
    model.cfg, model._padded = cfg, rows != model.vocab_size
    return model


def unpadded_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` (or ``state``, the model's whole state dict gathered already) with a
    padded output head cut back to the vocabulary: the book's shapes."""
    state = model.state_dict() if state is None else dict(state)
    vocab = int(model.cfg["vocab_size"])  # type: ignore[index]
    if state["out_head.weight"].shape[0] != vocab:
        state["out_head.weight"] = state["out_head.weight"][:vocab]
    return state


class MultiHeadAttention(nn.Module):
    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int, qkv_bias: bool = False
    ) -> None:
        super().__init__()
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        # Unused by the fused kernel, but kept (persistent) so state dicts match the book's both ways.
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        shape = (b, num_tokens, self.num_heads, self.head_dim)
        queries = self.W_query(x).view(shape).transpose(1, 2)
        keys = self.W_key(x).view(shape).transpose(1, 2)
        values = self.W_value(x).view(shape).transpose(1, 2)
        context = F.scaled_dot_product_attention(
            queries, keys, values, dropout_p=self.dropout.p if self.training else 0.0, is_causal=True
        )
        context = context.transpose(1, 2).reshape(b, num_tokens, self.d_out)
        return self.out_proj(context)


class LayerNorm(nn.Module):
    """The book's layer norm (biased variance, eps 1e-5) with its ``scale``/``shift`` names."""

    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """The book's tanh approximation of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        emb = cfg["emb_dim"]
        self.layers = nn.Sequential(nn.Linear(emb, 4 * emb), GELU(), nn.Linear(4 * emb, emb))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    """GPT-2 style decoder, state-dict compatible with the book's ``GPTModel``.

    ``cfg`` is the book's config dict; see :data:`GPT_CONFIG_124M`.
    """

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        cfg = normalize_config(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.vocab_size = int(cfg["vocab_size"])
        padded = padded_vocab_size(self.vocab_size, cfg.get("vocab_padding_multiple"))
        self.out_head = nn.Linear(cfg["emb_dim"], padded, bias=False)
        self._padded = padded != self.vocab_size

    @property
    def context_length(self) -> int:
        return int(self.cfg["context_length"])

    def forward(self, in_idx: torch.Tensor) -> torch.Tensor:
        _, seq_len = in_idx.shape
        if seq_len > self.context_length:
            raise ValueError(
                f"input has {seq_len} tokens but the model's context_length is {self.context_length}; "
                "crop the input (generate() does this with context_size)"
            )
        pos = torch.arange(seq_len, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))
        x = self.trf_blocks(x)
        logits = self.out_head(self.final_norm(x))
        if self._padded:  # padding ids can never be predicted: softmax gives them exactly 0
            logits.index_fill_(-1, self._padding_ids(logits.device), -math.inf)
        return logits

    def _padding_ids(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.vocab_size, self.out_head.out_features, device=device)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    context_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
) -> torch.Tensor:
    """Extend ``idx`` (batch x tokens) by up to ``max_new_tokens`` tokens, as the book's chapter-5 ``generate``.

    ``temperature == 0`` picks the most likely token (greedy); ``temperature > 0`` samples from the
    softmax of ``logits / temperature``, restricted to the ``top_k`` most likely tokens when given.
    Generation stops early when the chosen token equals ``eos_id`` (checked for a batch of one).
    The caller chooses train/eval mode; :class:`~enginekit.plugins.SampleText` switches to eval.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]
        if top_k is not None:
            kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth_best, -math.inf)
        if temperature > 0.0:
            probs = torch.softmax(logits / temperature, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if eos_id is not None and bool((idx_next == eos_id).all()):
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def text_to_token_ids(text: str, tokenizer: Any) -> torch.Tensor:
    """Encode ``text`` to a 1 x n tensor of ids (``<|endoftext|>`` allowed)."""
    return torch.tensor(tokenizer.encode(text, allowed_special={"<|endoftext|>"})).unsqueeze(0)


def __getattr__(name: str) -> Any:
    # GPT-2 weights in and out live in enginekit.pretrained, imported on first use so that
    # `import enginekit.gpt` stays free of it (and of the optional safetensors it needs)
    if name in ("crop_context", "load_pretrained", "save_pretrained"):
        from . import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: Any) -> str:
    """Decode a 1 x n (or n) tensor of ids back to text."""
    return tokenizer.decode(token_ids.squeeze(0).tolist())
