"""The fast path's parts, each against the book path it replaces."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from enginekit.fast import FAST, adamw, allow_tf32
from enginekit.gpt import GPTModel, generate, padded_vocab_size, unpadded_state_dict

from book_reference import RefGPT
from conftest import ROOT


def padded_twin(cfg: dict, multiple: int = 64) -> tuple[GPTModel, GPTModel]:
    torch.manual_seed(0)
    plain = GPTModel(cfg)
    padded = GPTModel({**cfg, "vocab_padding_multiple": multiple})
    state = plain.state_dict()
    head = padded.out_head.weight.detach().clone()
    head[: cfg["vocab_size"]] = state["out_head.weight"]
    padded.load_state_dict({**state, "out_head.weight": head})
    return plain.eval(), padded.eval()


def test_padded_vocab_sizes():
    assert padded_vocab_size(50257, 64) == 50304 and padded_vocab_size(50304, 64) == 50304
    assert padded_vocab_size(50257, None) == 50257
    with pytest.raises(ValueError, match="'vocab_padding_multiple' must be a positive int"):
        GPTModel({"vocab_size": 100, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 1,
                  "drop_rate": 0.0, "qkv_bias": False, "vocab_padding_multiple": 0})  # fmt: skip


def test_padded_head_gives_the_unpadded_loss_text_and_book_weights(tiny_cfg):
    plain, padded = padded_twin(tiny_cfg)
    assert padded.out_head.weight.shape[0] == 50304
    ids = torch.randint(0, 50257, (2, tiny_cfg["context_length"]))
    targets = torch.randint(0, 50257, ids.shape)
    padded_logits = padded(ids)
    assert torch.isneginf(padded_logits[..., 50257:]).all()
    plain_loss = F.cross_entropy(plain(ids).flatten(0, 1), targets.flatten())
    padded_loss = F.cross_entropy(padded_logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(padded_loss, plain_loss, rtol=1e-6, atol=0)
    padded_loss.backward()
    assert padded.out_head.weight.grad[50257:].abs().max() == 0  # the padding rows never learn
    start = ids[:1, :3]
    assert torch.equal(generate(plain, start, 8, 16), generate(padded, start, 8, 16))
    book = RefGPT(tiny_cfg)
    book.load_state_dict(unpadded_state_dict(padded))  # strict: the book's keys and shapes
    assert torch.equal(book.state_dict()["out_head.weight"], plain.state_dict()["out_head.weight"])


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_adamw_implementations_agree_with_the_default_to_rounding(implementation):
    def train(impl: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 4)
        opt = adamw(layer.parameters(), lr=1e-2, weight_decay=0.1, implementation=impl)
        for _ in range(5):
            layer(torch.randn(3, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in layer.parameters()]

    for fast, default in zip(train(implementation), train("default")):
        torch.testing.assert_close(fast, default, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="implementation must be 'default', 'fused' or 'foreach'"):
        adamw([torch.nn.Parameter(torch.ones(1))], lr=1e-3, weight_decay=0.0, implementation="apex")


def test_allow_tf32_switches_the_cuda_matmul_precision_and_back():
    before = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        allow_tf32()
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
        allow_tf32(False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def example():
    spec = importlib.util.spec_from_file_location("pretrain_verdict", ROOT / "examples" / "pretrain_verdict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_examples_fast_switch_turns_every_part_on_and_explicit_flags_win():
    ex = example()
    default = ex.parse_args([])
    assert (default.compile, default.tf32, default.adamw, default.pad_vocab, default.precision) == (
        False, False, "auto", None, "fp32",
    )  # fmt: skip
    fast = ex.parse_args(["--fast"])
    assert (fast.compile, fast.tf32, fast.adamw, fast.pad_vocab, fast.precision) == (
        FAST["compile"], FAST["tf32"], FAST["adamw"], FAST["vocab_padding_multiple"], FAST["precision"],
    )  # fmt: skip
    mixed = ex.parse_args(["--fast", "--precision", "fp32", "--adamw", "foreach", "--pad-vocab", "128"])
    assert (mixed.precision, mixed.adamw, mixed.pad_vocab) == ("fp32", "foreach", 128)
