from __future__ import annotations

import pytest
import torch

from enginekit.data import gpt2_tokenizer
from enginekit.gpt import GPT_CONFIG_124M, GPTModel, generate, text_to_token_ids, token_ids_to_text

from book_reference import RefGPT


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_book():
    with torch.device("meta"):
        assert n_params(GPTModel(GPT_CONFIG_124M)) == 162_419_712
        assert n_params(GPTModel({**GPT_CONFIG_124M, "context_length": 1024})) == 163_009_536


def test_state_dict_keys_and_shapes_are_the_books():
    with torch.device("meta"):
        ours = GPTModel(GPT_CONFIG_124M).state_dict()
        ref = RefGPT(GPT_CONFIG_124M).state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}
    for key in (
        "tok_emb.weight",
        "trf_blocks.0.att.W_query.weight",
        "trf_blocks.11.att.mask",
        "final_norm.scale",
        "out_head.weight",
    ):
        assert key in ours


def test_same_seed_gives_the_books_initial_weights(tiny_cfg):
    torch.manual_seed(123)
    ours = GPTModel(tiny_cfg).state_dict()
    torch.manual_seed(123)
    ref = RefGPT(tiny_cfg).state_dict()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key


def test_eval_outputs_equal_explicit_attention_math(tiny_cfg):
    cfg = {**tiny_cfg, "qkv_bias": True}
    torch.manual_seed(0)
    ref = RefGPT(cfg).eval()
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    idx = torch.randint(0, cfg["vocab_size"], (3, cfg["context_length"]))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), ref(idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(idx[:, :5]), ref(idx[:, :5]), atol=1e-5, rtol=1e-5)  # shorter than context


def test_book_state_dict_loads_both_ways(tiny_cfg):
    ref = RefGPT(tiny_cfg)
    ours = GPTModel(tiny_cfg)
    ours.load_state_dict(ref.state_dict())  # strict, mask buffers included
    ref.load_state_dict(ours.state_dict())


def test_ctx_len_is_a_synonym(tiny_cfg):
    cfg = dict(tiny_cfg)
    cfg["ctx_len"] = cfg.pop("context_length")
    model = GPTModel(cfg)
    assert model.pos_emb.weight.shape[0] == tiny_cfg["context_length"]
    with pytest.raises(ValueError, match="both 'ctx_len'"):
        GPTModel({**tiny_cfg, "ctx_len": 32})


@pytest.mark.parametrize(
    "key", ["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias"]
)
def test_missing_key_is_named(tiny_cfg, key):
    del tiny_cfg[key]
    with pytest.raises(ValueError, match=f"missing key.*'{key}'"):
        GPTModel(tiny_cfg)


def test_emb_dim_not_divisible_by_heads_is_named(tiny_cfg):
    with pytest.raises(ValueError, match="'emb_dim' \\(16\\) must be divisible by 'n_heads' \\(3\\)"):
        GPTModel({**tiny_cfg, "n_heads": 3})


def test_input_longer_than_context_is_a_clear_error(tiny_cfg):
    with pytest.raises(ValueError, match="context_length is 16"):
        GPTModel(tiny_cfg)(torch.zeros(1, 17, dtype=torch.long))


@pytest.fixture
def model_and_prompt(tiny_cfg):
    torch.manual_seed(1)
    model = GPTModel(tiny_cfg).eval()
    tok = gpt2_tokenizer()
    return model, text_to_token_ids("Every effort moves you", tok), tok


def test_greedy_generation_is_deterministic(model_and_prompt):
    model, prompt, tok = model_and_prompt
    a = generate(model, prompt, 12, context_size=16)
    b = generate(model, prompt, 12, context_size=16)
    assert a.shape == (1, 4 + 12) and torch.equal(a, b)
    assert token_ids_to_text(a, tok).startswith("Every effort moves you")
    # greedy is the argmax of the model's next-token logits
    assert a[0, 4].item() == model(prompt)[0, -1].argmax().item()


def test_top_k_1_equals_greedy(model_and_prompt):
    model, prompt, _ = model_and_prompt
    greedy = generate(model, prompt, 10, context_size=16)
    torch.manual_seed(5)
    sampled = generate(model, prompt, 10, context_size=16, temperature=1.5, top_k=1)
    assert torch.equal(sampled, greedy)


def test_temperature_sampling_uses_the_rng(model_and_prompt):
    model, prompt, _ = model_and_prompt
    torch.manual_seed(1)
    a = generate(model, prompt, 10, context_size=16, temperature=5.0)
    torch.manual_seed(1)
    b = generate(model, prompt, 10, context_size=16, temperature=5.0)
    torch.manual_seed(2)
    c = generate(model, prompt, 10, context_size=16, temperature=5.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generation_stops_at_end_of_text_id(model_and_prompt):
    model, prompt, _ = model_and_prompt
    full = generate(model, prompt, 8, context_size=16)
    eos = full[0, 4 + 3].item()  # the 4th generated token
    first = (full[0, 4:] == eos).nonzero()[0].item()
    stopped = generate(model, prompt, 8, context_size=16, eos_id=eos)
    assert torch.equal(stopped, full[:, : 4 + first])


def test_generation_crops_to_context_size(model_and_prompt):
    model, prompt, _ = model_and_prompt
    out = generate(model, prompt, 20, context_size=16)  # 24 tokens > context 16: must not raise
    assert out.shape == (1, 24)
